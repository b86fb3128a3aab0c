"""Plumbing every unclip LightningModule shares: optimiser + warmup schedule, per-step seeding,
data epoch, skipped-sample logging, and the split suffix of validation metrics."""

from __future__ import annotations

import math
from collections import Counter

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate

from unclip import registry
from unclip.seeding import hash_seed

VAL_SPLITS = ("", "_unseen")  # validation dataloader 0: seen compositions; 1: held-out compositions


def warmup_cosine(warmup_steps: int, total_steps: int | None, min_lr_ratio: float, schedule: str):
    """LR multiplier: linear warmup, then cosine decay to ``min_lr_ratio`` (or constant)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant" or not total_steps or total_steps <= warmup_steps:
            return 1.0
        progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"optim.schedule must be 'cosine' or 'constant', got {schedule!r}")
    return factor


class UnclipModule(pl.LightningModule):
    """Base class: subclasses implement ``training_step``/``validation_step`` and ``trainable_parameters``.

    A subclass that sets ``kind`` is a stage and registers itself (:mod:`unclip.registry`); ``aliases`` are
    its short names on the command line, ``colormap`` its hue in plots. Classes that only share code (such
    as ``PriorModule``) set no kind of their own."""

    kind: str
    aliases: tuple[str, ...] = ()
    colormap: str | None = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            registry.register(cls)

    def __init__(self, optim: dict | None = None, seed: int = 0):
        super().__init__()
        self.optim_cfg = optim or {"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 3e-4, "fused": True}}
        self.seed = seed
        self.skipped: Counter = Counter()

    # --------------------------------------------------------------------------- optimiser
    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        cfg = dict(self.optim_cfg)
        optimizer_cfg = dict(cfg["optimizer"])
        if optimizer_cfg.get("fused") and self._trainer is not None and self.trainer.gradient_clip_val \
                and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            optimizer_cfg["fused"] = False  # fp16's GradScaler: a fused step unscales inside, too late to clip
        # (what is frozen stays out: a LoRA run's base, unclip.lora)
        optimizer = instantiate(optimizer_cfg, _convert_="all")([p for p in self.trainable_parameters() if p.requires_grad])
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps and self.trainer.max_steps > 0 else None
        factor = warmup_cosine(int(cfg.get("warmup_steps", 0)), total, float(cfg.get("min_lr_ratio", 0.1)),
                               cfg.get("schedule", "cosine"))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and isinstance(self.trainer.strategy, FSDPStrategy):
            # FSDP shards the gradients, so Lightning's precision plugin refuses to clip them by norm; the
            # wrapped root module computes the norm over every shard
            self.trainer.model.clip_grad_norm_(gradient_clip_val)
            return
        fused = bool(getattr(optimizer, "defaults", {}).get("fused"))
        if gradient_clip_val and fused and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            # Lightning refuses to clip for a fused optimizer under mixed precision, fearing a GradScaler that
            # unscales inside the step; bf16 has none, so these are the true gradients: clip them here
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -------------------------------------------------------------------- determinism, data
    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Checkpoints hold no RNG state: seed every step from (seed, step, rank) so that timesteps, noise,
        # condition dropout and nn.Dropout of a resumed run repeat the uninterrupted run. The micro-batches of
        # one accumulated step share global_step, so their index joins the seed (else they draw the same noise).
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        parts = (self.seed, self.global_step, self.global_rank) + ((batch_idx % accumulate,) if accumulate > 1 else ())
        torch.manual_seed(hash_seed(*parts))
        self.log_skipped(batch)

    def log_skipped(self, batch: dict) -> None:
        for reason, count in (batch.get("skipped") or {}).items():
            self.skipped[reason] += int(count)
        for reason, total in self.skipped.items():
            self.log(f"data/skipped_{reason}", float(total), on_step=True, on_epoch=False, reduce_fx="sum", sync_dist=False)

    def cache_meta(self) -> dict | None:
        """The embedding cache's meta, after refusing a cache made by another CLIP than the run's; the
        CLIP identity goes into the hyperparameters (checkpoints name their CLIP, they do not hold it)."""
        from unclip.data import cache as cache_lib

        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or not getattr(datamodule, "cache_dir", None):
            return None
        meta = cache_lib.read_meta(datamodule.cache_dir)
        if getattr(self, "clip", None) is not None:
            cache_lib.check_identity(meta, self.clip.identity(), datamodule.cache_dir)
        self.hparams["clip"] = meta.get("clip", {})
        return meta

    @staticmethod
    def split_suffix(dataloader_idx: int) -> str:
        return VAL_SPLITS[dataloader_idx] if dataloader_idx < len(VAL_SPLITS) else f"_{dataloader_idx}"

    def log_val_loss(self, batch: dict, batch_idx: int, dataloader_idx: int) -> None:
        """``val/loss{suffix}`` of ``self.loss(batch)`` under a seed fixed per (split, batch), so successive
        validations draw the same timesteps and noise and their losses compare; the training RNG is left as it was."""
        with torch.random.fork_rng(devices=[self.device.index or 0] if self.device.type == "cuda" else []):
            torch.manual_seed(hash_seed(self.seed, "val", dataloader_idx, batch_idx))
            self.log(f"val/loss{self.split_suffix(dataloader_idx)}", self.loss(batch), batch_size=len(batch["key"]), sync_dist=True,
                     add_dataloader_idx=False)

    def save_image_rows(self, rows: list[torch.Tensor], name: str) -> None:
        """A PNG grid, one row per (N, 3, H, W) tensor in [-1, 1] (all the same shape), in the run dir's
        ``samples/`` (every logger) and to loggers that take images (wandb); rank 0 only, not while sanity checking."""
        from pathlib import Path

        from torchvision.utils import make_grid, save_image

        if self.trainer is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        grid = make_grid(torch.cat(rows).add(1).div(2).clamp(0, 1).cpu(), nrow=len(rows[0]))
        directory = Path(self.trainer.default_root_dir) / "samples"
        directory.mkdir(parents=True, exist_ok=True)
        save_image(grid, directory / f"{name}_step{self.global_step:07d}.png")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"samples/{name}", images=[grid], step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # where the class lives, so unclip.load finds a stage defined outside unclip (a str: weights_only-safe)
        checkpoint["stage_class"] = registry.qualified_name(type(self))
        if self.hparams.get("lora"):  # a LoRA run's checkpoints hold its adapter alone (unclip.lora)
            from unclip.adapters import keep_adapter

            keep_adapter(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.hparams.get("lora") and checkpoint.get("state_dict") is not None:
            from unclip.adapters import check_adapter_state

            check_adapter_state(self, checkpoint["state_dict"], "the checkpoint resumed")

    # ------------------------------------------------------------------------- publishing
    def publish(self, path) -> None:
        """Writes the finished stage to ``path``: a weights-only Lightning checkpoint whose ``state_dict``
        holds the EMA weights (training has ended: the net holds them) and whose hyperparameters say how
        to rebuild it. CLIP pretraining overrides this with a plain open_clip state dict."""
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.trainer.save_checkpoint(str(path), weights_only=True)
