"""Device, precision and thread choices, made once per run and recorded in its state."""

from __future__ import annotations

import contextlib
import os
import time

import torch

from .errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device asks for cuda but no CUDA device is available; use train.device=cpu")
    return dev


def flush_denormals() -> None:
    """Flush denormal floats to zero (x86 FTZ/DAZ; a no-op where unsupported).

    Numbers below ~1e-38 in fp32 take a microcode path that is ~30x slower per operation
    on x86 (measured here: 17 ms vs 0.6 ms to scale 4M of them). State-space decays
    exp(Δ A) and their products can reach that range once Δ grows during training, where
    flushing them changes nothing that matters (they are below 1e-38). The mode is per
    thread and worker threads copy it when they are created, so this must run before torch's first parallel op
    (the CLI calls it first thing; set_threads calls it too).
    """
    torch.set_flush_denormal(True)


def default_threads() -> int:
    """The thread count `threads=0` means: OMP_NUM_THREADS when it is set (as torch itself reads it), else every
    core this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def set_threads(n: int) -> None:
    flush_denormals()
    torch.set_num_threads(n if n > 0 else default_threads())


def _matmul_seconds(dtype: torch.dtype, device: torch.device, n: int = 768, reps: int = 6) -> float:
    a = torch.randn(2048, n, device=device, dtype=dtype)
    b = torch.randn(n, 2 * n, device=device, dtype=dtype)
    a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where bf16 matmuls beat fp32 on this device, else 'fp32'. Never fp16 on CPU.

    On CPUs with AMX, bf16 runs several times faster than fp32; on CPUs with only
    AVX512-BF16 it can be slower (measured: 165 vs 300 GFLOP/s on the 2-core dev VM), so
    'auto' measures instead of guessing (a ~0.1 s probe).
    """
    if requested == "fp16" and device.type == "cpu":
        raise ConfigError("train.precision=fp16 is refused on CPU (about 1000x slower than bf16/fp32 there); use auto, bf16 or fp32")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "fp32"
    bf16 = min(_matmul_seconds(torch.bfloat16, device) for _ in range(2))
    fp32 = min(_matmul_seconds(torch.float32, device) for _ in range(2))
    return "bf16" if bf16 < 0.9 * fp32 else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()
