"""Device resolution: the one place that decides where tensors live and in which precision."""
from __future__ import annotations

from ground.errors import UserInputError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "bf16", "fp32")


def check_device_name(device: str, what: str = "device") -> str:
    """``device`` if it is a name cbtm knows (auto, cpu, cuda, cuda:N, mps), else UserInputError.

    Cheap (no torch import): configs call it when they are built, before any stage runs.
    """
    name = str(device or "auto").lower()
    base, _, index = name.partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise UserInputError(f"unknown {what} {device!r}: use one of {', '.join(DEVICES)} (or cuda:N)")
    return name


def resolve_device(device: str = "auto") -> str:
    """A concrete torch device string for ``device`` ("auto": cuda if available, else cpu).

    Raises UserInputError (a ValueError) for an unknown name or a device this machine does not have.
    """
    import torch

    name = check_device_name(device)
    base = name.split(":")[0]
    if base == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if base == "cuda" and not torch.cuda.is_available():
        raise UserInputError(f"device {device!r} requested but CUDA is not available here: use device=cpu or auto")
    if base == "cuda" and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise UserInputError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    if base == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"device {device!r} requested but MPS is not available here: use device=cpu or auto")
    return name


def autocast_dtype(device: str, precision: str = "auto"):
    """The autocast dtype for training on ``device``: None means fp32.

    "auto" is bf16 on CUDA, and on CPUs with native bf16 (1.6-3.4x faster than fp32 there); fp32 elsewhere.
    """
    import torch

    if precision not in PRECISIONS:
        raise UserInputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.startswith("mps"):
        return None
    if precision == "auto" and device.startswith("cpu") and not cpu_has_bf16():
        return None  # emulated bf16 is ~3x slower than fp32 on CPUs without bf16 instructions
    return torch.bfloat16


def cpu_has_bf16() -> bool:
    """True when the CPU executes bf16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo on Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read(1 << 16)
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
