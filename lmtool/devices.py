"""Pick the torch device a run asks for, with a clear message when it is not there."""

from __future__ import annotations

import torch

from lmtool.errors import LmtoolError


def device_name(device: str | torch.device) -> str:
    """auto, cpu, cuda or mps from what a caller passed: a name, or one of torch's device objects."""
    name = str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str):
        raise LmtoolError(f"device must be auto, cpu, cuda or mps, got {type(device).__name__}")
    kind, colon, index = name.partition(":")
    if colon and kind in ("cpu", "cuda", "mps") and index.isascii() and index.isdecimal():
        if kind != "cuda" or int(index) == 0:  # one cpu, one mps; cuda:0 is the current GPU, as lmtool never switches
            return kind
        # lmtool uses the current GPU throughout (CUDA graphs, memory stats), so another is picked outside it
        raise LmtoolError(f"device {name!r}: lmtool uses the current GPU; choose which GPU that is with "
                          "CUDA_VISIBLE_DEVICES and use device cuda")
    if name not in ("auto", "cpu", "cuda", "mps"):
        raise LmtoolError(f"unknown device {name!r}; use auto, cpu, cuda or mps")
    return name


def resolve_device(name: str | torch.device) -> torch.device:
    """auto: cuda when present, else cpu; cuda and mps only when this machine has them."""
    name = device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LmtoolError("--device cuda was asked for but PyTorch sees no CUDA GPU here; use --device cpu or auto")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise LmtoolError("--device mps was asked for but this machine has no Apple GPU; use --device cpu or auto")
    return torch.device(name)


def bf16_is_native(device: torch.device) -> bool:
    """Whether this device computes bfloat16 in hardware (AVX-512 BF16 or AMX CPUs, Ampere or newer GPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = getattr(torch, "cpu", None)
        try:
            return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
        except AttributeError:  # an older torch without these probes: stay in fp32
            return False
    return False


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for training (None: plain fp32)."""
    if name == "bf16":
        if device.type == "mps":
            raise LmtoolError("train.precision=bf16 is not supported on mps; use fp32")
        return torch.bfloat16
    # auto picks bf16 only where it was measured faster at the same loss: CPUs with native bf16. On CUDA it
    # stays fp32: on an H100 and an H200 bf16 trained these models at 0.95-1.16x the fp32 speed
    # (bench/precision.py, bench/gpu_steps.py), since lmtool keeps cuDNN's recurrence in fp32 there.
    if name == "auto" and device.type == "cpu" and bf16_is_native(device):
        return torch.bfloat16
    return None


def inference_dtype(precision: str, device: torch.device | None = None) -> torch.dtype | None:
    """`--precision` of sample, score and evaluate-perplexity: fp32 (None: exact) or bf16, checked against the
    device if given."""
    if precision not in ("fp32", "bf16"):
        raise LmtoolError(f"--precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and device is not None and device.type == "mps":
        raise LmtoolError("--precision bf16 is not supported on mps; use fp32")
    return torch.bfloat16 if precision == "bf16" else None


def inference_autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context that `--precision` asks for: bf16 products, or (fp32) none at all."""
    dtype = inference_dtype(precision, device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype is not None)
