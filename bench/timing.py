"""Shared by the prior and decoder benches: timing our module's real training step, and the peer's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

PEER_PYTHON = Path(__file__).parent / ".venv-peer" / "bin" / "python"


def autocast(precision: str):
    """What Lightning's ``bf16-mixed`` does around the forward pass on a CPU (fp32 weights and optimiser)."""
    if precision == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision == "32-true":
        return nullcontext()
    raise ValueError(f"precision must be 32-true or bf16-mixed, got {precision!r}")


def train_steps_per_s(module, batch: dict, steps: int = 3, repeats: int = 2, precision: str = "32-true") -> dict:
    """Best steps/s of ``module.loss`` + backward + AdamW over ``repeats`` runs (the first step warms up)."""
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-4, fused=True)  # as conf/optim/adamw.yaml trains
    rates = []
    for _ in range(repeats):
        start = None
        for step in range(steps + 1):
            if step == 1:
                start = time.perf_counter()
            with autocast(precision):
                loss = module.loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(steps / (time.perf_counter() - start))

    def one_step():
        with autocast(precision):
            loss = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    from bench.roofline import dense_op_seconds, step_gflop

    return {"steps_per_s": max(rates), "params": sum(p.numel() for p in module.net.parameters()),
            "gflop_per_step": step_gflop(one_step), "dense_s": dense_op_seconds(one_step)}


def last_json_line(command: list[str], cwd: Path | None = None) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ours_steps_per_s(section: str, cfg: dict, steps: int = 3, repeats: int = 2) -> dict:
    """Our training step for ``section`` (prior | decoder) timed in a fresh process (``bench.worker``)."""
    return last_json_line([sys.executable, "-m", "bench.worker", section, json.dumps({**cfg, "steps": steps, "repeats": repeats})],
                          cwd=Path(__file__).resolve().parents[1])


def peer_steps_per_s(script: str, cfg: dict, steps: int = 3, repeats: int = 2) -> dict | None:
    """Runs ``bench/SCRIPT`` in the peer's own venv (``make bench`` builds it); None when that venv is missing."""
    if not PEER_PYTHON.exists():
        return None
    return last_json_line([str(PEER_PYTHON), str(Path(__file__).parent / script),
                           json.dumps({**cfg, "steps": steps, "repeats": repeats})])


def comparison_rows(what: str, peer_name: str | None, label: str, mine: dict, other: dict | None,
                    mine_bf16: dict | None = None) -> list[tuple[str, str, str]]:
    """Our row (fp32, and bf16-mixed when given) and the peer's (fp32) for one training-step benchmark, with
    the ratios: ours over the peer on the peer's row, bf16-mixed over our fp32 and over the peer on its own."""
    out = [(f"{what}, ours ({label}, fp32)", f"{mine['steps_per_s']:.3f} steps/s",
            f"{mine['params'] / 1e6:.1f}M params; peak RSS {mine['peak_rss_mib']:,.0f} MiB")]
    if mine_bf16 is not None:
        note = f"{mine_bf16['steps_per_s'] / mine['steps_per_s']:.2f}x our fp32"
        if other is not None:
            note += f", **{mine_bf16['steps_per_s'] / other['steps_per_s']:.2f}x** the peer's fp32"
        out.append((f"{what}, ours ({label}, bf16-mixed)", f"{mine_bf16['steps_per_s']:.3f} steps/s",
                    f"{note}; peak RSS {mine_bf16['peak_rss_mib']:,.0f} MiB"))
    if peer_name is None:  # no peer of this config
        return out
    if other is None:
        return out + [(peer_name, "not measured", "bench/.venv-peer missing: run `make bench`")]
    return out + [(f"{peer_name} ({label}, fp32)", f"{other['steps_per_s']:.3f} steps/s",
                   f"{other['params'] / 1e6:.1f}M params; peak RSS {other['peak_rss_mib']:,.0f} MiB; "
                   f"ours (fp32) is **{mine['steps_per_s'] / other['steps_per_s']:.2f}x**")]
