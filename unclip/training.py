"""What ``train.py`` does with a composed config: build data, CLIP, module, callbacks, logger and
trainer from their ``_target_``s, resume from the run directory's ``last.ckpt``, fit, publish."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from unclip import registry
from unclip.checkpoints import AtomicCheckpointIO, checkpoint_step, clear_partial_writes, resume_checkpoint
from unclip.loading import CheckpointError, check_clip, read_stage, resolve

log = logging.getLogger(__name__)


def run_name(name: str | None, override_dirname: str) -> str:
    """The run's folder name: ``run.name`` if set, else the command line's overrides, sanitised."""
    text = re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", name or override_dirname or "default")
    if len(text) > 120:  # long override lists (paths...) keep a readable head and a hash that keeps them distinct
        text = f"{text[:100]}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return text


OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def stage_hparam(spec: str | None, key: str):
    """``${stage_hparam:${init_from},net}``: a hyperparameter of the stage a run starts from, so a model config
    (``model=published_prior``) takes a converted stage's architecture, process and sampler as they are."""
    if not spec:
        raise ValueError(f"this model config takes its {key} from the stage it fine-tunes: pass init_from=PATH (a stage "
                         f"written by `python -m unclip.convert` or by training)")
    value = read_stage(resolve(spec)).get("hyper_parameters", {})
    for part in key.split("."):  # a dotted key reads into nested hyperparameters: net.unet.sample_size
        value = value.get(part) if isinstance(value, dict) else None
    return value


OmegaConf.register_new_resolver("stage_hparam", stage_hparam, replace=True, use_cache=True)


def init_weights(module, spec: str | Path, artifacts: str | Path = "outputs/artifacts") -> tuple[Path, dict]:
    """Starts ``module`` from a stage's weights (``init_from=``): a converted published stage or one trained
    here. Refuses another kind, another CLIP, and weights that do not fit the module, naming the keys.
    Returns the stage's path and state dict (a LoRA run names its base by them)."""
    path = resolve(spec, artifacts)
    checkpoint = read_stage(path)
    hparams = checkpoint.get("hyper_parameters") or {}
    if hparams.get("kind") != module.kind:
        raise ValueError(f"init_from={spec} is a {hparams.get('kind')!r} stage but this run trains {module.kind!r}; "
                         f"pick the matching model= (model=published_prior for a converted published prior)")
    if getattr(module, "clip", None) is not None:
        check_clip(module.clip, hparams.get("clip"))
    state, mine = checkpoint["state_dict"], module.state_dict()
    missing, unexpected = sorted(set(mine) - set(state)), sorted(set(state) - set(mine))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(mine[k].shape)}" for k in set(mine) & set(state)
                    if tuple(state[k].shape) != tuple(mine[k].shape))
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:6]) + (f", ... ({len(items)} in all)" if len(items) > 6 else "") if items else "none"
        raise ValueError(f"init_from={spec} does not fit this run's {module.kind}: missing {few(missing)}; unexpected "
                         f"{few(unexpected)}; shapes (stage vs run) {few(shapes)}. Make model.module.net match the stage's "
                         f"net ({sorted(hparams.get('net') or {})})")
    module.load_state_dict(state)
    log.info("initialised %s from %s", module.kind, path)
    return path, state


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
    # through a partial: instantiate's own first parameter is named ``config``, like WandbLogger's
    return instantiate(cfg.logger, _partial_=True, _convert_="all")(**kwargs)


class RunCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N steps and also at the end of each train epoch, which is where a run stopped by
    ``max_steps`` ends too. Lightning's ModelCheckpoint writes it at the end only when nothing was saved
    during the run, and then from ``on_train_end``: after the epoch was counted as complete (a resume would
    skip the rest of it) and after the EMA callback has put the averaged weights into the net. No version
    counter: a run that resumed past an unreadable ``last.ckpt`` overwrites it instead of writing ``last-v1``."""

    def __init__(self, **kwargs):
        super().__init__(enable_version_counter=False, **kwargs)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class ThreadShare(pl.Callback):
    """Follows a thread count that another process may change while this one trains: the file named by
    ``UNCLIP_THREADS_FILE``, read every ``every`` steps. ``make demo`` runs stages side by side and gives a
    stage the cores its neighbour leaves when the neighbour finishes."""

    ENV = "UNCLIP_THREADS_FILE"

    def __init__(self, path: str | Path, every: int = 10):
        self.path, self.every = Path(path), every

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx % self.every:
            return
        try:
            threads = int(self.path.read_text())
        except (OSError, ValueError):  # absent or being rewritten: keep the current count
            return
        if threads > 0 and threads != torch.get_num_threads():
            torch.set_num_threads(threads)


def build_trainer(cfg: DictConfig, directory: Path, callbacks: list | None = None) -> pl.Trainer:
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    every = trainer_cfg.pop("checkpoint_every_n_steps", None)
    checkpoint = RunCheckpoint(dirpath=str(directory / "checkpoints"), save_last=True, every_n_train_steps=every,
                               filename="step{step:07d}", auto_insert_metric_name=False, save_top_k=1,
                               monitor="step", mode="max")
    # stage callbacks (e.g. the EMA of the net) come from the model config
    stage_callbacks = [instantiate(c, _convert_="all") for c in (cfg.model.get("callbacks") or {}).values() if c]
    callbacks = [checkpoint, LearningRateMonitor(logging_interval="step"), *stage_callbacks, *(callbacks or [])]
    if os.environ.get(ThreadShare.ENV):
        callbacks.append(ThreadShare(os.environ[ThreadShare.ENV]))
    # checkpoints written atomically (temp file, fsync, rename): a kill mid-write never leaves a cut-short last.ckpt
    plugins = [*(trainer_cfg.pop("plugins", None) or []), AtomicCheckpointIO()]
    return instantiate(trainer_cfg, accelerator=cfg.strategy.accelerator, devices=cfg.strategy.devices,
                       num_nodes=cfg.strategy.num_nodes, strategy=build_strategy(cfg), logger=build_logger(cfg, directory),
                       callbacks=callbacks, plugins=plugins, default_root_dir=str(directory), _convert_="all")


def build_datamodule(cfg: DictConfig):
    return instantiate(cfg.data, _convert_="all")


def build_module(cfg: DictConfig, clip=None):
    extra = {"optim": OmegaConf.to_container(cfg.optim, resolve=True), "seed": int(cfg.seed)}
    if cfg.model.get("needs_clip"):
        extra["clip"] = clip
    # extra kwargs are passed after instantiation: Hydra would otherwise instantiate the optimiser config inside
    module = instantiate(cfg.model.module, _partial_=True, _convert_="all")(**extra)
    if cfg.model.get("eval"):  # the stage's evaluation settings travel in its checkpoint (unclip.eval.settings)
        block = cfg.model.eval  # (a plain dict when a resolver gave it: ${stage_hparam:...})
        module.hparams["eval"] = OmegaConf.to_container(block, resolve=True) if OmegaConf.is_config(block) else dict(block)
    if cfg.model.get("compile"):
        if not isinstance(getattr(module, "net", None), torch.nn.Module):
            raise ValueError(f"model.compile=true compiles the module's net, but {type(module).__name__} has no .net")
        # nn.Module.compile compiles in place: parameter names, and so checkpoints and the EMA copy, are
        # those of the plain net (torch.compile(net) would prefix every name with "_orig_mod.")
        module.net.compile()
    return module


def stage_kind(cfg: DictConfig) -> str:
    """The stage kind of the model config: its module class's own ``kind``."""
    return get_class(cfg.model.module._target_).kind


def artifact_path(cfg: DictConfig) -> Path:
    kind = stage_kind(cfg)
    suffix = ".ckpt" if getattr(registry.stage_class(kind), "loadable", True) else ".pt"
    return Path(cfg.paths.artifacts) / kind / f"{cfg.experiment.name}{suffix}"


def resume_path(cfg: DictConfig, directory: Path) -> str | None:
    """``ckpt_path`` (which must read), else the run dir's ``last.ckpt``, or the newest readable checkpoint
    beside it when it does not read (see :func:`unclip.checkpoints.resume_checkpoint`)."""
    if cfg.get("ckpt_path"):
        if not Path(cfg.ckpt_path).exists():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        try:
            if Path(cfg.ckpt_path).is_file():  # (a sharded checkpoint is a folder, read by Lightning)
                checkpoint_step(Path(cfg.ckpt_path))
        except CheckpointError as error:
            raise CheckpointError(f"ckpt_path={cfg.ckpt_path} is not a readable unclip checkpoint (truncated, another "
                                  f"format, or not a checkpoint): {error.reason}; point ckpt_path at another checkpoint, "
                                  f"or leave it unset to resume from the run dir", error.reason) from error
        return str(cfg.ckpt_path)
    found = resume_checkpoint(directory / "checkpoints", warn=rank_zero_only.rank == 0)
    return str(found) if found else None


CONFIG_FILE = "config.yaml"  # the resolved config of the run, in its directory
# What may change when a run resumes: how long it runs, where it logs, how it is launched and where files
# live (the same list Hydra leaves out of the run's folder name). Anything else makes it another run.
RESUMABLE_CHANGES = ("trainer.max_steps", "trainer.max_epochs", "trainer.enable_progress_bar", "logger", "launcher",
                     "hydra", "paths", "ckpt_path", "publish", "data.num_workers", "data.pin_memory", "model.compile",
                     "model.module.net.channels_last")  # a memory layout: the same function, the same parameters


# Keys added after runs were stored, with the value that reproduces how those runs behaved: a stored config
# without one resumes as if it had that value. (train.py built a random-weight CLIP right after seeding with
# ``seed``, 0 by default: the same weights as init_seed 0; a CLIP that differs is refused by the cache's identity check.)
ADDED_KEYS = {"clip.init_seed": 0, "finetune.method": "full"}


def flatten(tree, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b.c": leaf}; lists are leaves (compared whole)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(stored: dict, current: dict) -> list[str]:
    """``key: old -> new`` for every key that differs outside :data:`RESUMABLE_CHANGES`."""
    absent = "<absent>"
    old, new = flatten(stored), flatten(current)
    old.update({key: value for key, value in ADDED_KEYS.items() if key not in old and key in new})
    return [f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}" for key in sorted(set(old) | set(new))
            if old.get(key, absent) != new.get(key, absent)
            and not any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE_CHANGES)]


def check_and_store_config(cfg: DictConfig, directory: Path) -> None:
    """On resume from the run dir's ``last.ckpt``, refuses a config that differs from the stored one outside
    run length, logging and launching, naming the keys; then (rank 0) stores the resolved config."""
    current = OmegaConf.to_container(cfg, resolve=True)
    path = directory / CONFIG_FILE
    if not cfg.get("ckpt_path") and path.exists() and (directory / "checkpoints" / "last.ckpt").exists():
        differences = config_differences(OmegaConf.to_container(OmegaConf.load(path)), current)
        if differences:
            raise ValueError(f"run dir {directory} holds a run made with another config; resuming it would mix two runs. "
                             f"Differences (stored -> now): {'; '.join(differences)}. Only {', '.join(RESUMABLE_CHANGES)} "
                             f"may change on resume: give the new run its own run.name, or pass ckpt_path={path.parent}/"
                             f"checkpoints/last.ckpt to start from its weights with the new config")
    if rank_zero_only.rank == 0:  # atomic: other ranks (or a requeued job) may read it meanwhile
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        OmegaConf.save(OmegaConf.create(current), tmp)
        os.replace(tmp, path)


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
    check_and_store_config(cfg, directory)
    if rank_zero_only.rank == 0:
        clear_partial_writes(directory / "checkpoints")
    pl.seed_everything(int(cfg.seed), workers=True)
    torch.set_float32_matmul_precision("high")
    clip = instantiate(cfg.clip, _convert_="all") if cfg.model.get("needs_clip") else None
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, clip)
    trainer = build_trainer(cfg, directory)
    ckpt = resume_path(cfg, directory)
    lora = (cfg.get("finetune") or {}).get("method", "full") == "lora"
    # a resumed run has its own weights; a LoRA run's own are its adapter alone, on the base loaded again
    base = init_weights(module, cfg.init_from, cfg.paths.artifacts) if cfg.get("init_from") and (not ckpt or lora) else (None, None)
    if lora:
        from unclip import lora as lora_lib  # peft: imported by LoRA runs only

        lora_lib.start(module, OmegaConf.to_container(cfg.finetune, resolve=True), cfg.get("init_from"), *base, resumed=ckpt)
    if ckpt:
        log.info("resuming from %s", ckpt)
        # Lightning warns about any mid-epoch resume of a loader it cannot restore itself; the DataModule's
        # own state (epoch, batches consumed) restores the position
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
    # weights_only: a checkpoint holds tensors and plain containers only (hyperparameters, loop, data and EMA state)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    if cfg.get("publish") and trainer.is_global_zero:
        path = artifact_path(cfg)
        module.publish(path)
        log.info("published %s", path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    finish_wandb(trainer)
    return metrics


def finish_wandb(trainer: pl.Trainer) -> None:
    """Closes the wandb run before returning: Lightning leaves it to an exit hook, and a sweep job (Hydra
    multirun, submitit) can return, or start the next job in the same process, before that hook has
    flushed the run's history to disk."""
    from lightning.pytorch.loggers import WandbLogger

    if trainer.is_global_zero and any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
        import wandb

        if wandb.run is not None:  # the logger's run (never started if nothing was logged)
            wandb.finish()
