"""Several training processes (torchrun): who this process is, and the few collectives the trainer needs.

Every helper is a no-op in a single process, so the training loop reads the same either way. Decisions that
depend on something local go through helpers that give every rank the same answer bit for bit: wall time and
signals through `max_each` (host values), the step loss through `average` (an all-reduce on the
device). Ranks that decided differently would wait for each other forever.
"""

from __future__ import annotations

import ctypes
import gc
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator, Sequence

import torch

from lmtool.errors import LmtoolError

# How long a rank waits for the others in one collective (rank 0 alone builds the vocabulary meanwhile).
TIMEOUT = timedelta(minutes=30)


class PeerFailed(LmtoolError):
    """Another rank stopped the run; its own message says why (this one only repeats it)."""


class PeersLost(LmtoolError):
    """A collective failed: another rank died or was stopped."""

    exit_code = 1


def quiet(error: LmtoolError) -> LmtoolError:
    """Mark an error that every rank raises together, so that only rank 0 prints it (the CLI skips quiet ones)."""
    error.quiet = True  # type: ignore[attr-defined]
    return error


@dataclass
class DistributedContext:
    """This process's place in the job; `world_size == 1` means no process group and free no-op helpers."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    host_group: Any = field(default=None, repr=False)  # gloo group for host-side values (NCCL holds GPU tensors)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, writes the run directory and its checkpoints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK on GPUs (one GPU per process)."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def rows(self, batch_size: int) -> slice:
        """This rank's contiguous share of `batch_size` streams (all of them in a single process)."""
        return slice(self.rank * batch_size // self.world_size, (self.rank + 1) * batch_size // self.world_size)

    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """The module to train through: DistributedDataParallel when distributed, else the model itself."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [model_device.index] if (model_device := next(model.parameters()).device).type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)

    def average(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor on this rank's device (NCCL on GPUs: the host does not wait).
        Every rank receives the same reduced bits."""
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        total = tensor.detach().clone()
        with _peers_lost():
            dist.all_reduce(total)
        return total / self.world_size

    # --- collectives on the host (CPU tensors, gloo); each is a no-op in a single process --------------

    def gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape and dtype everywhere), in rank order, on the CPU."""
        tensor = tensor.detach().cpu().contiguous()
        if not self.enabled:
            return [tensor]
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        with _peers_lost():
            dist.all_gather(parts, tensor, group=self.host_group)
        return parts

    def mean_in_rank_order(self, values: Sequence[float]) -> list[float]:
        """The mean over ranks of each value, summed in rank order so every rank gets the same bits."""
        return [v / self.world_size for v in self.sum_in_rank_order(values)]

    def sum_in_rank_order(self, values: Sequence[float]) -> list[float]:
        """The sum over ranks of each value, in rank order: the same bits on every rank."""
        if not self.enabled:
            return list(values)
        parts = self.gather(torch.tensor(values, dtype=torch.float64))
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.tolist()

    def max_each(self, values: Sequence[int]) -> list[int]:
        """The largest of every rank's values, position by position, in one collective."""
        if not self.enabled:
            return list(values)
        return torch.stack(self.gather(torch.tensor(values, dtype=torch.int64))).max(dim=0).values.tolist()

    def broadcast_bytes(self, data: bytes | None, src: int = 0) -> bytes:
        """Rank `src`'s bytes on every rank (JSON text, never pickle)."""
        if not self.enabled:
            assert data is not None
            return data
        import torch.distributed as dist

        size = torch.tensor([len(data) if self.rank == src else 0], dtype=torch.int64)
        with _peers_lost():
            dist.broadcast(size, src=src, group=self.host_group)
            buffer = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src and data
                      else torch.empty(int(size), dtype=torch.uint8))
            if int(size):
                dist.broadcast(buffer, src=src, group=self.host_group)
        return ctypes.string_at(buffer.data_ptr(), int(size)) if int(size) else b""

    def agree(self, error: LmtoolError | None) -> None:
        """After a phase that can fail on some ranks only: if any rank failed, every rank raises.

        The failing rank (the lowest one, if several) raises its own error; the others raise `PeerFailed`
        with its message and exit code, so no rank waits in a collective for one that has gone.
        """
        if not self.enabled:
            if error is not None:
                raise error
            return
        codes = [int(part) for part in self.gather(torch.tensor(error.exit_code if error else 0, dtype=torch.int64))]
        failed = [rank for rank, code in enumerate(codes) if code]
        if not failed:
            return
        first = failed[0]
        message = self.broadcast_bytes(str(error).encode() if self.rank == first else None, src=first).decode()
        if error is not None and self.rank == first:
            raise error
        peer_failed = PeerFailed(f"rank {first} failed: {message}", exit_code=codes[first])
        raise quiet(peer_failed) if not self.is_main else peer_failed

    @contextmanager
    def reported_by_main(self) -> Iterator[None]:
        """Errors that all ranks raise at the same step (divergence, a signal, a limit) are printed by rank 0 only."""
        try:
            yield
        except LmtoolError as err:
            if self.enabled and not self.is_main and not isinstance(err, PeersLost):
                quiet(err)
            raise


@contextmanager
def _peers_lost() -> Iterator[None]:
    """A collective that fails because a peer died becomes one clear line (the peer's own message says why)."""
    try:
        yield
    except RuntimeError as err:
        raise PeersLost(
            f"lost contact with the other training processes ({str(err).splitlines()[0][:200]}); "
            "another rank stopped: its message says why"
        ) from None


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """The number of processes torchrun started (1 when not launched by torchrun)."""
    environ = os.environ if environ is None else environ
    try:
        return int(environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise LmtoolError(f"WORLD_SIZE={environ['WORLD_SIZE']!r} is not a number of processes") from None


@contextmanager
def distributed_session(device: torch.device) -> Iterator[DistributedContext]:
    """Join the process group torchrun set up (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment) for the length of a run; a plain single-process context otherwise.

    NCCL on GPUs, gloo on the CPU; host-side decisions always travel over gloo. A group that the caller already
    initialised is used and left alone.
    """
    world_size = launched_world_size()
    if world_size <= 1:
        yield DistributedContext()
        return
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type not in ("cpu", "cuda"):
        raise LmtoolError(f"distributed training runs on CUDA GPUs or CPUs, not on {device.type}; use --device cuda or cpu")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise LmtoolError(
                f"local rank {local_rank} has no GPU of its own (this machine has {torch.cuda.device_count()}); "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local_rank)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, **({"device_id": torch.device("cuda", local_rank)}
                                                             if backend == "nccl" else {}))
    try:
        host_group = dist.new_group(backend="gloo", timeout=TIMEOUT) if dist.get_backend() != "gloo" else None
        with warnings.catch_warnings():
            if rank != 0:  # rank 0 warns for everyone (the ranks read the same data)
                warnings.simplefilter("ignore")
            yield DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, host_group=host_group)
        if owned:  # no rank tears the group down while another is still in its last collective (gloo aborts)
            dist.barrier(group=host_group)
    finally:
        if owned:
            gc.collect()  # DDP wrappers dropped by the caller (they sit in reference cycles) go before their group
            dist.destroy_process_group()
