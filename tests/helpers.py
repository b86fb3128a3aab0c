"""Small pieces several test files share."""

import csv
from pathlib import Path

import torch


def train_steps(module, batch: dict, optimizer, steps: int) -> None:
    """``steps`` optimiser steps of ``module.loss`` on one fixed batch (the overfitting tests)."""
    for _ in range(steps):
        loss = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def fixed_loss(module, batch: dict, seed: int = 1) -> float:
    """``module.loss(batch)`` with the same timesteps and noise every call (a before/after comparison)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return module.loss(batch).item()


def logged_keys(run: Path) -> set[str]:
    """Every metric key with a value in a run dir's CSV logs (all versions: a resumed run writes a new one)."""
    return {k for path in run.glob("csv/version_*/metrics.csv") for row in csv.DictReader(open(path)) for k, v in row.items() if v}


def picture(objects: list[dict], seed: int = 0, size: int = 64):
    """``objects`` drawn as the shapes generator draws them, on one of its backgrounds: (H, W, 3) in [0, 1]."""
    import random

    import numpy as np

    from unclip.data.shapes import background_color, object_color, render

    rng = random.Random(seed)
    for obj in objects:
        obj.setdefault("rgb", list(object_color(obj["color"], rng)))
    return np.asarray(render(objects, background_color(rng), size, 4, rng), dtype=np.float32) / 255
