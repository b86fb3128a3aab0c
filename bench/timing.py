"""Shared by the prior and decoder benches: timing our module's real training step, and the peer's."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

PEER_PYTHON = Path(__file__).parent / ".venv-peer" / "bin" / "python"


def train_steps_per_s(module, batch: dict, steps: int = 3, repeats: int = 2) -> dict:
    """Best steps/s of ``module.loss`` + backward + AdamW over ``repeats`` runs (the first step warms up)."""
    optimizer = torch.optim.AdamW(module.net.parameters(), lr=1e-4)
    rates = []
    for _ in range(repeats):
        start = None
        for step in range(steps + 1):
            if step == 1:
                start = time.perf_counter()
            loss = module.loss(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(steps / (time.perf_counter() - start))
    return {"steps_per_s": max(rates), "params": sum(p.numel() for p in module.net.parameters())}


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


def comparison_rows(what: str, peer_name: str, label: str, mine: dict, other: dict | None) -> list[tuple[str, str, str]]:
    """Our row and the peer's for one training-step benchmark, with the ratio on the peer's row."""
    out = [(f"{what}, ours ({label}, fp32)", f"{mine['steps_per_s']:.3f} steps/s",
            f"{mine['params'] / 1e6:.1f}M params; peak RSS {mine['peak_rss_mib']:,.0f} MiB")]
    if other is None:
        return out + [(peer_name, "not measured", "bench/.venv-peer missing: run `make bench`")]
    return out + [(f"{peer_name} ({label}, fp32)", f"{other['steps_per_s']:.3f} steps/s",
                   f"{other['params'] / 1e6:.1f}M params; peak RSS {other['peak_rss_mib']:,.0f} MiB; "
                   f"ours is **{mine['steps_per_s'] / other['steps_per_s']:.2f}x**")]
