"""The training step replayed as one CUDA graph.

A small recurrent model's step launches hundreds of short kernels (cuDNN runs a few per time step and layer),
and on a fast GPU the host launching them, not the GPU, sets the pace. Captured once as a CUDA graph, the
whole step (forward, backward, the bad-step guard, clipping and the optimiser) is launched by one call. The
step then reads its inputs from fixed buffers and carries the recurrent state in place, which is what this
module arranges; `capture=False` runs the same code without a graph (the CPU path tests use).
"""

from __future__ import annotations

from typing import Callable

import torch

from lmtool.model import State, map_state

# Eager steps before the first capture: libraries initialise lazily (cuBLAS workspaces, cuDNN plans, the
# optimiser's state), and none of that may happen during a capture.
WARMUP_STEPS = 3

# body(x, y, state, step) -> the next state: one whole training step on these inputs; `step` is the step's
# 1-based number, a device tensor inside a graph.
StepBody = Callable[[torch.Tensor, torch.Tensor, State, "int | torch.Tensor"], State]


class GraphedStep:
    """Runs `body` on fixed input buffers and a state carried in place; on CUDA (`capture`), after
    WARMUP_STEPS eager steps on a side stream, replays one captured graph per step. A graph bakes in the
    learning rate, so a new one is captured when it changes. Windows of another shape (an epoch's shorter last
    window) run eagerly on the same buffers. If a capture fails the step runs eagerly from then on, and
    `failure` says why."""

    def __init__(self, body: StepBody, capture: bool) -> None:
        self.body, self.capture = body, capture
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self.state: State | None = None  # the carried state: the trainer's `hidden` while graphed
        self.step_number: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_lr: float | None = None
        self.eager_steps = 0
        self.failure: str | None = None

    @property
    def replaying(self) -> bool:
        return self.graph is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: State, step: int, lr: float) -> State:
        """One training step on window (x, y) from `state`; returns the carried state after it."""
        if self.x is None:
            self.x, self.y = torch.empty_like(x), torch.empty_like(y)
            self.step_number = torch.zeros((), dtype=torch.int64, device=x.device)
        if self.state is None:
            self.state = map_state(torch.clone, state)
        elif state is not self.state:  # a new epoch's zero state, or a restored one
            _copy_state(self.state, state)
        if x.shape != self.x.shape or not self.capture or self.failure is not None:
            _copy_state(self.state, self.body(x, y, self.state, step))
            return self.state
        self.x.copy_(x)
        self.y.copy_(y)
        self.step_number.fill_(step)
        if self.eager_steps < WARMUP_STEPS:
            self._warm_up()
        elif self.graph is None or lr != self.graph_lr:
            self._capture(lr)
        if self.graph is not None:
            self.graph.replay()
        return self.state

    def _run_body(self) -> None:
        _copy_state(self.state, self.body(self.x, self.y, self.state, self.step_number))

    def _warm_up(self) -> None:
        side = torch.cuda.Stream(self.x.device)
        side.wait_stream(torch.cuda.current_stream(self.x.device))
        with torch.cuda.stream(side):
            self._run_body()
        torch.cuda.current_stream(self.x.device).wait_stream(side)
        self.eager_steps += 1

    def _capture(self, lr: float) -> None:
        self.graph = None  # frees the previous graph's memory before the next capture
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._run_body()
        except Exception as error:  # noqa: BLE001 - any failure to capture means: train without graphs
            torch.cuda.synchronize(self.x.device)
            self.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            self._run_body()  # this step, eagerly: nothing of the failed capture has run
            return
        self.graph, self.graph_lr = graph, lr


def _copy_state(into: State, source: State) -> None:
    """Copy `source` into the tensors of `into`, which has the same structure."""
    if isinstance(into, tuple):
        for a, b in zip(into, source):
            _copy_state(a, b)
    elif into is not source:
        into.copy_(source)
