"""Small pieces several test files share."""


def train_steps(module, batch: dict, optimizer, steps: int) -> None:
    """``steps`` optimiser steps of ``module.loss`` on one fixed batch (the overfitting tests)."""
    for _ in range(steps):
        loss = module.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
