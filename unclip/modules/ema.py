"""EMA of a module's ``net`` only, as a Lightning callback.

Lightning's own ``EMAWeightAveraging`` averages a copy of the whole LightningModule; ours also holds a
frozen CLIP and constant buffers (normalisation stats), which must neither be copied nor averaged. This
callback keeps ``torch.optim.swa_utils.AveragedModel(pl_module.net)`` and follows the checkpoint
contract: the checkpoint's ``state_dict`` holds the EMA net (what ``unclip.load`` returns), the raw
training weights sit beside it under ``current_model_state`` for resuming. Validation and the end of fit
use the EMA weights.
"""

from __future__ import annotations

import itertools

import lightning.pytorch as pl
import torch
from lightning.fabric.strategies.model_parallel import _load_raw_module_state
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from torch.optim.swa_utils import AveragedModel


def warmup_ema(decay: float, warmup: float):
    """EMA update with decay min(decay, (1 + n) / (warmup + n)) after n updates: early on the average
    follows the net closely instead of keeping the random initialisation for thousands of steps
    (0.999 alone still gives the initial weights 13 % after 2,000 steps)."""
    @torch.no_grad()
    def update(averaged: list, current: list, num_averaged) -> None:
        n = int(num_averaged)
        d = min(decay, (1 + n) / (warmup + n)) if warmup > 0 else decay
        torch._foreach_lerp_(averaged, current, 1 - d)
    return update


def share_frozen(average: torch.nn.Module, net: torch.nn.Module) -> None:
    """Puts the net's frozen parameters (a LoRA run's base) into its averaged copy in place of their copies:
    the EMA of a constant is that constant, so the average tracks what trains and the base is held once."""
    live = dict(net.named_parameters())
    for name, copy in list(average.named_parameters()):
        if name in live and not live[name].requires_grad and copy is not live[name]:
            parent, _, leaf = name.rpartition(".")
            setattr(average.get_submodule(parent), leaf, live[name])


class NetEMA(Callback):
    def __init__(self, decay: float = 0.999, warmup: float = 10.0, update_every_n_steps: int = 1, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.update_every_n_steps, self.start_step = update_every_n_steps, start_step
        self.average: AveragedModel | None = None
        self.swapped = False
        self._last_update_step = 0
        self._restored_n_averaged: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1:
            # FSDP leaves each rank a shard of every parameter between steps; the average is a whole copy
            raise ValueError(f"the EMA callback keeps an unsharded copy of the net and cannot follow FSDP over "
                             f"{trainer.world_size} devices: train with strategy=ddp, or drop the EMA with ~model.callbacks.ema")
        if stage == "fit" and self.average is None:
            self.average = AveragedModel(pl_module.net, multi_avg_fn=warmup_ema(self.decay, self.warmup), use_buffers=True)
            share_frozen(self.average.module, pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # optimiser steps so far
        if step > self._last_update_step and step > self.start_step and (step - 1) % self.update_every_n_steps == 0:
            self.average.update_parameters(pl_module.net)
            self._last_update_step = step

    # ---------------------------------------------------------------------------------- swapping
    def _pairs(self, pl_module):
        averaged = itertools.chain(self.average.module.parameters(), self.average.module.buffers())
        current = itertools.chain(pl_module.net.parameters(), pl_module.net.buffers())
        return ((a, c) for a, c in zip(averaged, current) if a is not c)  # (a frozen parameter is shared: nothing to swap)

    @torch.no_grad()
    def swap(self, pl_module) -> None:
        for averaged, current in self._pairs(pl_module):
            tmp = averaged.data.clone()
            averaged.data.copy_(current.data)
            current.data.copy_(tmp)
        self.swapped = not self.swapped

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if self.average is not None and not self.swapped:
            self.swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.swapped:
            self.swap(pl_module)

    @torch.no_grad()
    def on_fit_end(self, trainer, pl_module) -> None:
        # on_fit_end, not on_train_end: resuming a run that already reached max_steps skips the training
        # loop and its hooks, and would then publish the raw weights
        if self.average is None:
            return
        for averaged, current in self._pairs(pl_module):
            current.data.copy_(averaged.data)

    # ------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.average is None:
            return
        state = checkpoint["state_dict"]
        ema = {f"net.{k}": v.detach().clone() for k, v in self.average.module.state_dict().items()}
        if self.swapped:  # saved during validation: the module holds the EMA weights, the average the raw ones
            state, ema = {**state, **ema}, {k: state[k] for k in ema}
        checkpoint["current_model_state"] = state
        checkpoint["state_dict"] = {**state, **ema}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "current_model_state" not in checkpoint or self.average is None:
            return
        state = checkpoint.get("state_dict")
        if state is None:  # FSDP loads the state_dict into its wrapped model itself and drops it from the checkpoint
            state = torch.load(trainer.ckpt_path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
        ema = {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}
        # a LoRA run's checkpoint holds the adapter alone (its module checked the keys and loads non-strictly)
        strict = getattr(pl_module, "strict_loading", True)
        self.average.module.load_state_dict(ema, strict=strict)
        if isinstance(trainer.strategy, FSDPStrategy):  # the raw weights go through the wrapped model too
            _load_raw_module_state(checkpoint["current_model_state"], trainer.strategy.model, trainer.world_size)
        else:
            pl_module.load_state_dict(checkpoint["current_model_state"], strict=strict)
        if self._restored_n_averaged is not None:
            self.average.n_averaged.fill_(self._restored_n_averaged)

    def state_dict(self) -> dict:
        n = int(self.average.n_averaged) if self.average is not None else 0
        return {"n_averaged": n, "last_update_step": self._last_update_step}

    def load_state_dict(self, state: dict) -> None:
        self._last_update_step = int(state.get("last_update_step", 0))
        self._restored_n_averaged = int(state.get("n_averaged", 0))
        if self.average is not None:
            self.average.n_averaged.fill_(self._restored_n_averaged)
