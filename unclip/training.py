"""What ``train.py`` does with a composed config: build data, CLIP, module, callbacks, logger and
trainer from their ``_target_``s, resume from the run directory's ``last.ckpt``, fit, publish."""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def run_name(name: str | None, override_dirname: str) -> str:
    """The run's folder name: ``run.name`` if set, else the command line's overrides, sanitised."""
    text = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", name or override_dirname or "default")
    if len(text) > 120:  # long override lists (paths...) keep a readable head and a hash that keeps them distinct
        text = f"{text[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return text


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def run_dir(cfg: DictConfig) -> Path:
    """Hydra's output dir when running under Hydra, else the same layout from ``paths``."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.paths.runs) / cfg.experiment.name / cfg.model.name / run_name(cfg.run.name, "")


def build_strategy(cfg: DictConfig):
    strategy = cfg.strategy.strategy
    if not isinstance(strategy, DictConfig):
        return strategy
    extra = {}
    if cfg.strategy.get("wrap_classes"):
        extra["auto_wrap_policy"] = {get_class(name) for name in cfg.strategy.wrap_classes}
    return instantiate(strategy, **extra, _convert_="all")


def build_logger(cfg: DictConfig, directory: Path):
    if cfg.logger is None:
        return False
    kwargs = {"save_dir": str(directory)}
    if "WandbLogger" in cfg.logger._target_:
        kwargs["id"] = f"{cfg.experiment.name}-{cfg.model.name}-{directory.name}"[:128].replace("/", "_")
        kwargs["resume"] = "allow"
        kwargs["config"] = OmegaConf.to_container(cfg, resolve=True)
    return instantiate(cfg.logger, **kwargs, _convert_="all")


def build_trainer(cfg: DictConfig, directory: Path, callbacks: list | None = None) -> pl.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    every = trainer_cfg.pop("checkpoint_every_n_steps", None)
    checkpoint = ModelCheckpoint(dirpath=str(directory / "checkpoints"), save_last=True, every_n_train_steps=every,
                                 filename="step{step:07d}", auto_insert_metric_name=False, save_top_k=1,
                                 monitor="step", mode="max")
    # stage callbacks (e.g. the EMA of the net) come from the model config
    stage_callbacks = [instantiate(c, _convert_="all") for c in (cfg.model.get("callbacks") or {}).values() if c]
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="step"), *stage_callbacks, *(callbacks or [])]
    return instantiate(trainer_cfg, accelerator=cfg.strategy.accelerator, devices=cfg.strategy.devices,
                       num_nodes=cfg.strategy.num_nodes, strategy=build_strategy(cfg), logger=build_logger(cfg, directory),
                       callbacks=callbacks, default_root_dir=str(directory), _convert_="all")


def build_datamodule(cfg: DictConfig):
    return instantiate(cfg.data, _convert_="all")


def build_module(cfg: DictConfig, clip=None):
    extra = {"optim": OmegaConf.to_container(cfg.optim, resolve=True), "seed": int(cfg.seed)}
    if cfg.model.get("needs_clip"):
        extra["clip"] = clip
    # extra kwargs are passed after instantiation: Hydra would otherwise instantiate the optimiser config inside
    return instantiate(cfg.model.module, _partial_=True, _convert_="all")(**extra)


def artifact_path(cfg: DictConfig) -> Path:
    suffix = ".pt" if cfg.model.kind == "clip" else ".ckpt"
    return Path(cfg.paths.artifacts) / cfg.model.kind / f"{cfg.experiment.name}{suffix}"


def resume_path(cfg: DictConfig, directory: Path) -> str | None:
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(cfg.ckpt_path)
    last = directory / "checkpoints" / "last.ckpt"
    return str(last) if last.exists() else None


def require_complete(cfg: DictConfig) -> None:
    """Fails before any work when a required value (``???``) was not given on the command line."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required config value(s): {', '.join(missing)}; set them on the command line, "
                         f"e.g. {missing[0]}=...")


def fit(cfg: DictConfig) -> dict:
    """Trains one stage; returns the final logged metrics (used by Hydra sweeps)."""
    require_complete(cfg)
    directory = run_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision("high")
    clip = instantiate(cfg.clip, _convert_="all") if cfg.model.get("needs_clip") else None
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, clip)
    trainer = build_trainer(cfg, directory)
    ckpt = resume_path(cfg, directory)
    if ckpt:
        log.info("resuming from %s", ckpt)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if cfg.get("publish") and trainer.is_global_zero:
        path = artifact_path(cfg)
        module.publish(path)
        log.info("published %s", path)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
