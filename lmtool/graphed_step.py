"""The training step replayed as one CUDA graph (and evaluation's windows: lmtool.evaluate.stream_nll).

A small recurrent model's step launches hundreds of short kernels (cuDNN runs a few per time step and layer),
and on a fast GPU the host launching them, not the GPU, sets the pace. Captured once as a CUDA graph, the
whole step (forward, backward, the bad-step guard, clipping and the optimiser) is launched by one call. The
step then reads its inputs from fixed buffers and carries the recurrent state in place, which is what this
module arranges. Capturing is a function passed in (`capture_cuda_graph` on a GPU), so the same buffers,
warm-up, re-capture and fallback run on a CPU in tests, with a stand-in for the graph.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from lmtool.model import State, map_state

# Eager steps before the first capture: libraries initialise lazily (cuBLAS workspaces, cuDNN plans, the
# optimiser's state), and none of that may happen during a capture.
WARMUP_STEPS = 3

# body(x, y, state, step) -> the next state: one whole training step on these inputs; `step` is the step's
# 1-based number, a device tensor when the step is captured.
StepBody = Callable[[torch.Tensor, torch.Tensor, State, "int | torch.Tensor"], State]

# capture(run) -> replay: records what `run()` launches without running it; each replay() runs it again.
Capture = Callable[[Callable[[], None]], Callable[[], None]]


def on_current_gpu(device: torch.device) -> bool:
    """Whether `device` is the CUDA GPU that captures record on (the current one): a capture there would not
    record the kernels of a model on another GPU (reasoned from how captures work; not observed on a GPU)."""
    return device.type == "cuda" and (device.index is None or device.index == torch.cuda.current_device())


def capture_cuda_graph(run: Callable[[], None], generators: Sequence[torch.Generator] = ()) -> Callable[[], None]:
    """`run` captured as a CUDA graph on the current device; returns its replay. `generators`: the CUDA random
    generators other than the default that `run` draws from (each replay then draws new numbers from them)."""
    graph = torch.cuda.CUDAGraph()
    for generator in generators:
        graph.register_generator_state(generator)
    stream = torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph):
            run()
    finally:
        # A capture that fails can leave its own stream current: the steps after it must not run there.
        torch.cuda.set_stream(stream)
    return graph.replay


class GraphedStep:
    """Runs `body` on fixed input buffers (windows of `width` tokens) and a state carried in place. With
    `capture`, after WARMUP_STEPS eager steps it captures the step once and replays it; a graph bakes in the
    learning rate, so a new one is captured when that changes. Windows of another width (an epoch's shorter
    last one) run eagerly on the same state. If a capture fails, every later step runs eagerly and `failure`
    says why."""

    def __init__(self, body: StepBody, width: int, capture: Capture | None) -> None:
        self.body, self.width, self.capture = body, width, capture
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.state: State | None = None  # the carried state: the trainer's `hidden` while this runs
        self.step_number: torch.Tensor | None = None
        self.replay: Callable[[], None] | None = None
        self.replay_lr: float | None = None
        self.eager_steps = 0
        self.captures = 0
        self.failure: str | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: State, step: int, lr: float) -> State:
        """One training step on window (x, y) from `state`; returns the carried state after it."""
        if self.state is None:
            self.state = map_state(torch.clone, state)
        elif state is not self.state:  # a new epoch's zero state, or a restored one
            _copy_state(self.state, state)
        if x.size(-1) != self.width or self.failure is not None:
            _copy_state(self.state, self.body(x, y, self.state, step))
            return self.state
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
            self.step_number = torch.zeros((), dtype=torch.int64, device=x.device)
        self.x.copy_(x)
        self.y.copy_(y)
        self.step_number.fill_(step)
        if self.capture is None:
            self._run_body()
        elif self.eager_steps < WARMUP_STEPS:
            self._warm_up()
        elif self.replay is None or lr != self.replay_lr:
            self._capture(lr)
        if self.replay is not None:
            self.replay()
        return self.state

    def _run_body(self) -> None:
        _copy_state(self.state, self.body(self.x, self.y, self.state, self.step_number))

    def _warm_up(self) -> None:
        self.eager_steps += 1
        if not self.x.is_cuda:
            self._run_body()
            return
        # On a side stream, as PyTorch's graph recipe does, so that lazily created state is not tied to the
        # stream that will be captured.
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            self._run_body()
        torch.cuda.current_stream(self.x.device).wait_stream(side)

    def _capture(self, lr: float) -> None:
        self.replay = None  # frees the previous graph's memory before the next capture
        try:
            replay = self.capture(self._run_body)
        except Exception as error:  # noqa: BLE001 - any failure to capture means: train without graphs
            cause = error.__context__ or error  # a failed capture_end hides the error that invalidated it
            if self.x.is_cuda:
                torch.cuda.synchronize(self.x.device)
            self.failure = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            self._run_body()  # this step, eagerly: nothing of the failed capture has run
            return
        self.replay, self.replay_lr = replay, lr
        self.captures += 1


def _copy_state(into: State, source: State) -> None:
    """Copy `source` into the tensors of `into`, which has the same structure."""
    map_state(lambda a, b: a if a is b else a.copy_(b), into, source)
