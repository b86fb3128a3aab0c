"""What the hardware allows a training step: its FLOPs (matmuls, convolutions and attention, forward and
backward, counted by torch's FlopCounterMode on the real step) over the machine's own measured rate for
the step's dominant operation, in the same run. A step at 100 % of its roofline spends all its time in
that operation at that rate; the rest (norms, activations, casts, the optimiser) is what it loses."""

from __future__ import annotations

import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten
# the operations FlopCounterMode counts in our steps: what the roofline's FLOPs run in
DENSE_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.convolution.default,
             aten.convolution_backward.default, aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_flash_attention_for_cpu_backward.default}


def step_gflop(step) -> float:
    """GFLOP of one call of ``step()`` (forward + backward + optimiser, whatever it runs)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / 1e9


class RecordDenseOps(TorchDispatchMode):
    """Records each dense operation of a step with its arguments' shapes, strides and dtypes."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in DENSE_OPS:
            spec = tuple(("tensor", tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else ("value", a)
                         for a in args)
            self.calls.append((func, spec, tuple(sorted((kwargs or {}).items()))))
        return func(*args, **(kwargs or {}))


def dense_op_seconds(step, repeats: int = 5) -> float:
    """Seconds the dense operations of one call of ``step()`` (matmuls, convolutions, fused attention) take
    when each runs alone, warmed up, at its own shapes, memory layouts and dtypes: what the step would cost if
    nothing else (norms, activations, casts, the optimiser) took any time. A bound that, unlike the roofline,
    knows the layouts (a weight gradient's transposed matmul runs at half a plain one's rate)."""
    recorder = RecordDenseOps()
    with recorder:
        step()
    timed: dict[tuple, float] = {}
    total = 0.0
    for func, spec, kwargs in recorder.calls:
        key = (func, repr(spec), repr(kwargs))  # convolutions take lists (stride, padding)
        if key not in timed:
            args = [torch.empty_strided(a[1], a[2], dtype=a[3]).normal_() if a[0] == "tensor" and a[3].is_floating_point
                    else torch.zeros(a[1], dtype=a[3]) if a[0] == "tensor" else a[1] for a in spec]
            times = []
            with torch.no_grad():
                for _ in range(2 + repeats):
                    start = time.perf_counter()
                    func(*args, **dict(kwargs))
                    times.append(time.perf_counter() - start)
            timed[key] = min(times[2:])
        total += timed[key]
    return total


def best_rate(fn, flop: float, repeats: int = 10, warmup: int = 5) -> float:
    """GFLOP/s of ``fn`` at its best of ``repeats`` after ``warmup`` calls (oneDNN picks and JITs its AMX /
    AVX-512 kernels on the first calls: an unwarmed bf16 matmul reads several times slower than it runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flop / min(times) / 1e9


def matmul_gflops(dtype: torch.dtype, m: int = 5184, k: int = 512, n: int = 2048) -> float:
    """A transformer prior's MLP matmul (batch 64 x 81 positions, width 512 -> 2048)."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    return best_rate(lambda: a @ b, 2 * m * k * n)


def conv_gflops(dtype: torch.dtype, batch: int = 8, channels: int = 128, size: int = 32) -> float:
    """A UNet's 3x3 convolution (batch 8, 128 channels, 32 px), in channels_last as oneDNN prefers."""
    x = torch.randn(batch, channels, size, size, dtype=dtype).to(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
    with torch.no_grad():
        return best_rate(lambda: conv(x), 2 * batch * channels * channels * 9 * size * size)


def dense_bound_row(what: str, seconds: float, measured: float, precision: str) -> tuple[str, str, str]:
    limit = 1 / seconds
    return (f"{what} dense-op bound ({precision})", f"{limit:.3f} steps/s",
            f"its matmuls, convolutions and attention alone, each at its own shapes and layouts: {seconds * 1e3:,.0f} ms "
            f"a step; ours {measured:.3f} steps/s = **{100 * measured / limit:.0f} %** of it")


def roofline_row(what: str, gflop: float, rate: float, measured: float, precision: str, op: str) -> tuple[str, str, str]:
    limit = rate / gflop  # steps/s if every FLOP ran at the measured rate
    return (f"{what} roofline ({precision})", f"{limit:.3f} steps/s",
            f"{gflop:,.0f} GFLOP per step at {rate:,.0f} GFLOP/s ({op}); ours {measured:.3f} steps/s = "
            f"**{100 * measured / limit:.0f} %** of it")
