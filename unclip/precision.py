"""Which floating-point precision to run in: bf16 where the hardware computes it natively, fp32 elsewhere.

Training takes Lightning's precision names (``32-true``, ``bf16-mixed``); sampling takes the same names and
runs the nets under ``torch.autocast`` for ``bf16-mixed`` (weights, schedules and the sampler's updates stay
fp32; matmuls and convolutions run in bf16).
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("auto", "32-true", "bf16-mixed")


def auto_precision(cpu_flags: str | None = None, cuda: bool | None = None) -> str:
    """``bf16-mixed`` on a GPU and on CPUs with native bf16 matmuls (AVX512-BF16 or AMX: 2-5x an fp32
    matmul), ``32-true`` elsewhere: without them torch emulates bf16, about 100x slower than fp32."""
    if torch.cuda.is_available() if cuda is None else cuda:
        return "bf16-mixed"
    return "bf16-mixed" if bf16_unit(cpu_flags) else "32-true"


def bf16_unit(cpu_flags: str | None = None) -> str | None:
    """What multiplies bf16 on this CPU: ``amx`` (AMX tiles, ~10x an fp32 matmul), ``avx512_bf16`` (dot-product
    instructions alone, ~2.5x), or None (emulated)."""
    words = set((machine_cpu_flags() if cpu_flags is None else cpu_flags).split())
    return "amx" if "amx_bf16" in words else "avx512_bf16" if "avx512_bf16" in words else None


@lru_cache(maxsize=1)
def machine_cpu_flags() -> str:
    """/proc/cpuinfo, read once (sampling asks on every batch)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.read_text() if cpuinfo.exists() else ""


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """``auto`` made concrete for ``device`` (a CPU's flags, or a GPU); the others checked and returned."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision != "auto":
        return precision
    return auto_precision(cuda=torch.device(device).type == "cuda")


def sampling_autocast(precision: str, device: torch.device | str):
    """The context sampling runs the nets in: bf16 autocast for ``bf16-mixed``, nothing for ``32-true``."""
    device = torch.device(device)
    if resolve_precision(precision, device) == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
