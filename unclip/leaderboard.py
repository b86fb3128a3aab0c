"""Priors judged by the images they lead to: image metrics through one shared decoder, the prior
leaderboard, and quality against sampling steps. Run through ``unclip.evaluate``:

    python -m unclip.evaluate mode=images prior=diffusion decoder=decoder n=2
    python -m unclip.evaluate mode=leaderboard priors=[diffusion,ar,contrastive]   # or: ... leaderboard priors=[...]
    python -m unclip.evaluate mode=steps prior=diffusion decoder=decoder

* ``images``: the prompt suite (``conf/prompt_suites``, all of it or ``suite_limit`` entries) -> prior ->
  decoder, ``n`` samples per prompt from one seed, scored by the attribute classifier (overall; ``seen``
  vs ``unseen`` = entries tagged ``holdout``; per tag ``single`` / ``two`` / ``variant``), by CLIP score
  against the prompts with the run's CLIP, and by FD_CLIP against real val images. ``prior`` may also be
  ``baseline_zt`` or ``baseline_linear``. Writes ``images.json`` and ``images.md``.
* ``leaderboard``: the two baselines and every prior on the same val pools and seeds: a config-driven
  sweep (``sweep.<kind>``: guidance scales, and steps where the prior has them) of the prior metrics
  with ms per sample, then one setting per prior (``image_setting.<kind>``) decoded through one decoder
  for the image metrics. Writes ``leaderboard.{md,csv,json}``, ``leaderboard_cost.png``,
  ``leaderboard_steps.png``, ``grid_<prior>.png`` and ``grids.png``; logs one wandb run per prior in one
  group (``wandb=false`` to skip).
* ``steps``: attribute accuracy, CLIP score and latency against (a) the prior's DDIM steps at fixed
  decoder settings and (b) the decoder's DDIM steps, plus ancestral DDPM on the full chain, at a fixed
  prior setting (one ẑ_i set shared by every decoder setting). Writes ``steps.{csv,md,png}``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unclip.attributes import CellPredictions, load_classifier, predict, score_predictions
from unclip.data import cache as cache_lib
from unclip.data.datamodule import hash_seed
from unclip.evaluate import COLUMNS, SPLITS, baseline_rows, evaluate_prior, markdown, val_pool, write_csv
from unclip.image_metrics import clip_scores, fd_clip
from unclip.loading import load
from unclip.metrics import BASELINES, baseline_predictions
from unclip.pipeline import UnCLIPPipeline
from unclip.plots import grids_figure, plot_cost, plot_quality_vs_steps, plot_steps
from unclip.prompts import load_suite
from unclip.sampling import save_grid

log = logging.getLogger(__name__)

DECODER_KEYS = ("guidance_scale", "steps", "eta", "sampler")
# subsets of the prompt suite scored on their own, by the entries' tags
GROUPS: dict[str, Callable[[Sequence[str]], bool]] = {
    "seen": lambda tags: "holdout" not in tags,
    "unseen": lambda tags: "holdout" in tags,
    "single": lambda tags: "single" in tags,
    "two": lambda tags: "two" in tags,
    "variant": lambda tags: "variant" in tags,
}
PRIOR_COLUMNS = [f"{c}{s}" for s in SPLITS.values() for c in COLUMNS]
IMAGE_COLUMNS = ["ms_per_image", "attr_acc", "attr_acc_seen", "attr_acc_unseen", "attr_prompt", "clip_score",
                 "clip_score_seen", "clip_score_unseen", "fd_clip"]


# ------------------------------------------------------------------------------------- baselines


class BaselinePrior:
    """A parameter-free stand-in for a prior, so the baselines get image metrics too: ẑ_i = z_t
    (``baseline_zt``) or the ridge map z_t W + b fit on train pairs (``baseline_linear``), normalised.
    Guidance and steps mean nothing to it; its sampling cost is nil."""

    def __init__(self, kind: str, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
        if kind == "baseline_linear" and (weight is None or bias is None):
            raise ValueError("baseline_linear needs the linear map's weight and bias (the cache's stats.npz)")
        self.kind, self.weight, self.bias = kind, weight, bias
        self.hparams = {"kind": kind, "clip": {}}  # no CLIP of its own: the pipeline's identity check passes
        self.device = torch.device("cpu")
        self.checkpoint_path = None

    @classmethod
    def from_cache(cls, kind: str, cache_dir: str | Path) -> "BaselinePrior":
        stats = cache_lib.load_stats(cache_dir)
        return cls(kind, torch.as_tensor(stats["linear_weight"]).float(), torch.as_tensor(stats["linear_bias"]).float())

    def to(self, device) -> "BaselinePrior":
        self.device = torch.device(device)
        self.weight = None if self.weight is None else self.weight.to(self.device)
        self.bias = None if self.bias is None else self.bias.to(self.device)
        return self

    def eval(self) -> "BaselinePrior":
        return self

    def condition(self, batch: dict) -> dict:
        return {"z_txt_raw": batch["txt_emb"].float().to(self.device)}

    def sample(self, cond: dict, generator: torch.Generator | None = None, **_settings) -> torch.Tensor:
        z_txt = cond["z_txt_raw"]
        weight = self.weight if self.weight is not None else torch.eye(z_txt.shape[-1], device=z_txt.device)
        bias = self.bias if self.bias is not None else torch.zeros(z_txt.shape[-1], device=z_txt.device)
        return F.normalize(baseline_predictions(z_txt, weight, bias)[self.kind].float(), dim=-1)


def load_prior(spec: str | Path, clip, artifacts: str | Path, cache_dir: str | Path):
    """A baseline by name, or a trained prior by checkpoint path or published name (EMA weights)."""
    if str(spec) in BASELINES:
        return BaselinePrior.from_cache(str(spec), cache_dir)
    module = load(spec, clip=clip, artifacts=artifacts)
    if not module.kind.endswith("_prior"):
        raise ValueError(f"{spec!r} is a {module.kind} stage, not a prior (diffusion, ar, contrastive, a prior "
                         f"checkpoint, or one of {', '.join(BASELINES)})")
    return module


def has_steps(prior) -> bool:
    """Whether the prior samples by a diffusion chain (so ``steps`` means something to it)."""
    return getattr(prior, "diffusion", None) is not None


def with_prior(pipe: UnCLIPPipeline, prior) -> UnCLIPPipeline:
    """The same decoder (and upsamplers) behind another prior; the pipeline checks the CLIPs agree."""
    return UnCLIPPipeline(pipe.clip, pipe.decoder, prior, pipe.upsamplers, pipe.device)


# ---------------------------------------------------------------------------------- prompt suite


def evenly(items: Sequence, k: int) -> list:
    """``k`` items spread evenly over ``items`` (the first included)."""
    return [items[(j * len(items)) // k] for j in range(k)] if k else []


def spread_subset(entries: list[dict], limit: int) -> list[dict]:
    """``limit`` suite entries spread over the suite, in suite order. Held-out (unseen) entries are taken
    in proportion, but at least one when there are any and ``limit`` >= 2, so a small subset still has
    both splits."""
    if limit < 1:
        raise ValueError(f"suite_limit must be a positive number of prompts or null (all), got {limit}")
    unseen = [i for i, e in enumerate(entries) if not GROUPS["seen"](e["tags"])]
    seen = [i for i, e in enumerate(entries) if GROUPS["seen"](e["tags"])]
    k_unseen = min(len(unseen), round(limit * len(unseen) / max(len(entries), 1)))
    if unseen and limit >= 2:
        k_unseen = max(1, k_unseen)
    k_seen = min(len(seen), limit - k_unseen)
    return [entries[i] for i in sorted(evenly(seen, k_seen) + evenly(unseen, k_unseen))]


def suite_entries(version: str, limit: int | None) -> list[dict]:
    entries = load_suite(version)
    return entries if limit is None or limit >= len(entries) else spread_subset(entries, int(limit))


def repeat(entries: list[dict], key: str, n: int) -> list:
    """Each entry's ``key``, n times in a row: the layout of n samples per prompt."""
    return [e[key] for e in entries for _ in range(n)]


# ------------------------------------------------------------------------------------ generation


def seeded(seed: int, *parts, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(hash_seed(seed, *parts))


def batches(count: int, batch_size: int):
    """(index, slice) of consecutive batches over ``count`` rows."""
    for index, start in enumerate(range(0, count, batch_size)):
        yield index, slice(start, min(start + batch_size, count))


@torch.no_grad()
def sample_embeddings(pipe: UnCLIPPipeline, prompts: Sequence[str], seed: int, settings: dict,
                      batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """ẑ_i (N, D), unit norm, one per prompt, batch b drawn from a generator seeded by (seed, "prior", b);
    and the seconds spent in the prior's sampling (text encoding excluded, as in ``evaluate_prior``)."""
    out, elapsed = [], 0.0
    for index, rows in batches(len(prompts), batch_size):
        cond = pipe.text_embeddings(list(prompts[rows]))
        generator = seeded(seed, "prior", index, device=pipe.device)
        start = time.perf_counter()
        out.append(F.normalize(pipe.prior.sample(cond, generator, **settings).float(), dim=-1))
        elapsed += time.perf_counter() - start
    return torch.cat(out), elapsed


def check_decoder_settings(settings: dict) -> dict:
    unknown = set(settings) - set(DECODER_KEYS)
    if unknown:
        raise ValueError(f"unknown decoder setting(s) {sorted(unknown)}; known: {', '.join(DECODER_KEYS)}")
    return settings


@contextmanager
def decoder_sampler(decoder, kind: str | None):
    """The decoder's sampler switched to another loop for the duration: ``ddpm`` is ancestral sampling
    (Ho et al. 2020, Alg. 2) over the (respaced) chain, ``ddim`` is Song et al. 2021, eq. 12, ``dpmpp_2m``
    and ``unipc`` the second-order multistep ODE solvers (``unclip.diffusion.samplers``)."""
    original = decoder.sampler
    if kind is not None and kind != original.kind:
        decoder.sampler = dataclasses.replace(original, kind=kind)  # validates the kind, fresh respacing cache
    try:
        yield decoder.sampler
    finally:
        decoder.sampler = original


@torch.no_grad()
def decode_embeddings(pipe: UnCLIPPipeline, z_img: torch.Tensor, prompts: Sequence[str], seed: int, settings: dict,
                      batch_size: int = 64) -> tuple[torch.Tensor, float]:
    """Pixels (N, 3, H, W) in [-1, 1] decoded from ẑ_i (and the prompts, for a text-conditioned decoder),
    batch b from a generator seeded by (seed, "decoder", b); and the seconds spent decoding."""
    settings = check_decoder_settings(dict(settings))
    out, elapsed = [], 0.0
    with decoder_sampler(pipe.decoder, settings.get("sampler")):
        for index, rows in batches(len(z_img), batch_size):
            generator = seeded(seed, "decoder", index, device=pipe.device)
            start = time.perf_counter()
            pixels = pipe.decode(z_img[rows], generator, settings.get("guidance_scale"), settings.get("steps"),
                                 list(prompts[rows]), eta=settings.get("eta"))
            elapsed += time.perf_counter() - start
            out.append(pixels.float().cpu())
    return torch.cat(out), elapsed


def timings(prior_seconds: float, decode_seconds: float, count: int) -> dict:
    ms = lambda s: 1000 * s / max(count, 1)  # noqa: E731
    return {"ms_prior": ms(prior_seconds), "ms_decode": ms(decode_seconds), "ms_per_image": ms(prior_seconds + decode_seconds)}


# --------------------------------------------------------------------------------------- scoring


def subset(pred: CellPredictions, rows: list[int]) -> CellPredictions:
    index = torch.as_tensor(rows, dtype=torch.long)
    return CellPredictions(pred.shape[index], pred.color[index], pred.size[index])


@torch.no_grad()
def score_images(pixels: torch.Tensor, entries: list[dict], n: int, clip, classifier, real_images: torch.Tensor | None) -> dict:
    """Attribute accuracy (overall, and ``attr_acc_<group>`` per :data:`GROUPS`), CLIP score against the
    prompts (overall and per group), and FD_CLIP against ``real_images``, for n images per entry."""
    objects, tags, prompts = repeat(entries, "objects", n), repeat(entries, "tags", n), repeat(entries, "prompt", n)
    if len(pixels) != len(objects):
        raise ValueError(f"{len(pixels)} images for {len(entries)} prompts x {n} samples")
    predictions = predict(classifier, pixels)
    scores = clip_scores(clip, pixels, prompts)
    metrics = score_predictions(predictions, objects)
    metrics["clip_score"] = float(scores.mean())
    for group, member in GROUPS.items():
        rows = [i for i, t in enumerate(tags) if member(t)]
        metrics[f"attr_acc_{group}"] = score_predictions(subset(predictions, rows), [objects[i] for i in rows])["attr_acc"]
        metrics[f"clip_score_{group}"] = float(scores[rows].mean()) if rows else math.nan
        metrics[f"n_{group}"] = len(rows)
    enough = real_images is not None and len(real_images) >= 2 and len(pixels) >= 2  # a covariance needs two
    metrics["fd_clip"] = fd_clip(clip, real_images, pixels) if enough else math.nan
    metrics["n_images"], metrics["n_real"] = len(pixels), 0 if real_images is None else len(real_images)
    return metrics


def evaluate_images(pipe: UnCLIPPipeline, entries: list[dict], n: int, seed: int, classifier,
                    real_images: torch.Tensor | None, prior_settings: dict | None = None,
                    decoder_settings: dict | None = None, batch_size: int = 64) -> dict:
    """Prompt suite entries -> ``pipe``'s prior -> its decoder, n samples each from ``seed``; the image
    metrics of :func:`score_images` plus ms per image (prior, decoder, both)."""
    prompts = repeat(entries, "prompt", n)
    z_img, prior_seconds = sample_embeddings(pipe, prompts, seed, dict(prior_settings or {}), batch_size)
    pixels, decode_seconds = decode_embeddings(pipe, z_img, prompts, seed, dict(decoder_settings or {}), batch_size)
    metrics = score_images(pixels, entries, n, pipe.clip, classifier, real_images)
    return {**metrics, **timings(prior_seconds, decode_seconds, len(prompts))}


# ---------------------------------------------------------------------------------- steps sweep


def steps_sweep(pipe: UnCLIPPipeline, entries: list[dict], n: int, seed: int, classifier, prior_steps: Sequence[int],
                decoder_steps: Sequence[int], decoder_ddpm: bool = False, prior_settings: dict | None = None,
                decoder_settings: dict | None = None, real_images: torch.Tensor | None = None,
                batch_size: int = 64) -> list[dict]:
    """Image quality and latency against sampling steps: one row per prior DDIM step count (decoder at
    ``decoder_settings``), then one per decoder DDIM step count and, with ``decoder_ddpm``, one for
    ancestral DDPM over the decoder's whole training chain (prior at ``prior_settings``, its ẑ_i drawn
    once, so the rows differ by the decoder alone)."""
    prior_settings, decoder_settings = dict(prior_settings or {}), check_decoder_settings(dict(decoder_settings or {}))
    if prior_steps and not has_steps(pipe.prior):
        raise ValueError(f"prior {pipe.prior.kind} has no sampling steps to sweep; set prior_steps=[]")
    rows = []
    for steps in prior_steps:
        setting = {**prior_settings, "steps": int(steps)}
        log.info("steps sweep: prior %s", label(setting))
        metrics = evaluate_images(pipe, entries, n, seed, classifier, real_images, setting, decoder_settings, batch_size)
        rows.append({"sweep": "prior", "sampler": "ddim", "steps": int(steps), "prior": pipe.prior.kind,
                     "prior_settings": label(setting), "decoder_settings": label(decoder_settings), **metrics})
    prompts = repeat(entries, "prompt", n)
    z_img, prior_seconds = sample_embeddings(pipe, prompts, seed, prior_settings, batch_size)
    chains = [("ddim", int(s)) for s in decoder_steps]
    chains += [("ddpm", pipe.decoder.diffusion.num_timesteps)] if decoder_ddpm else []
    for sampler, steps in chains:
        setting = {**decoder_settings, "sampler": sampler, "steps": steps}
        log.info("steps sweep: decoder %s", label(setting))
        pixels, decode_seconds = decode_embeddings(pipe, z_img, prompts, seed, setting, batch_size)
        metrics = score_images(pixels, entries, n, pipe.clip, classifier, real_images)
        rows.append({"sweep": "decoder", "sampler": sampler, "steps": steps, "prior": pipe.prior.kind,
                     "prior_settings": label(prior_settings), "decoder_settings": label(setting), **metrics,
                     **timings(prior_seconds, decode_seconds, len(prompts))})
    return rows


# ------------------------------------------------------------------------------------- settings


def label(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "default"


def normalise_setting(setting: dict) -> dict:
    """Guidance scales as floats and step counts as ints, so 4 and 4.0 name one setting."""
    out = dict(setting)
    if out.get("guidance_scale") is not None:
        out["guidance_scale"] = float(out["guidance_scale"])
    if isinstance(out.get("steps"), (int, float)):
        out["steps"] = int(out["steps"])
    return out


def sweep_settings(sweep: dict, kind: str) -> list[dict]:
    """Every combination of the values swept for a prior kind (config ``sweep.<kind>``: knob -> list)."""
    if kind not in sweep:
        raise ValueError(f"unknown prior kind {kind!r} for the leaderboard sweep: add sweep.{kind} to conf/evaluate.yaml "
                         f"(known: {', '.join(sweep)})")
    knobs = dict(sweep[kind] or {})
    names = list(knobs)
    grid = [normalise_setting(dict(zip(names, values))) for values in itertools.product(*(list(knobs[k]) for k in names))]
    return grid or [{}]


def plain(node):
    """A config node as plain dicts and lists (anything else as it is)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def settings_of(node) -> dict:
    """A settings mapping from the config without its null entries (null: the stage's own default)."""
    return normalise_setting({k: v for k, v in (plain(node) or {}).items() if v is not None})


# ------------------------------------------------------------------------------- shared context


@dataclass
class ImageContext:
    """What every image evaluation of one command shares: the decoder pipeline (no prior yet), the
    prompts, the classifier and the real images FD_CLIP compares with."""

    pipe: UnCLIPPipeline
    entries: list[dict]
    classifier: torch.nn.Module
    real_images: torch.Tensor


def real_val_images(cfg: DictConfig, size: int, count: int) -> torch.Tensor:
    """Up to ``count`` real images of the val split at the decoder's resolution: FD_CLIP's reference set."""
    datamodule = instantiate(cfg.data, _convert_="all", train=cfg.data.val, fields=["image"], image_size=size,
                             batch_size=cfg.data.val_batch_size)
    batches = val_pool(datamodule, count, splits=("val",)).get("val", [])
    return torch.cat([b["image"].float() for b in batches]) if batches else torch.zeros(0, 3, size, size)


def image_context(cfg: DictConfig, clip) -> ImageContext:
    decoder = load(cfg.decoder, clip=clip, artifacts=cfg.paths.artifacts)
    upsamplers = [load(spec, clip=clip, artifacts=cfg.paths.artifacts) for spec in cfg.upsamplers]
    pipe = UnCLIPPipeline(clip, decoder, None, upsamplers)
    entries = suite_entries(cfg.suite, cfg.suite_limit)
    classifier = load_classifier(cfg.classifier)
    real = real_val_images(cfg, pipe.image_size, len(entries) * int(cfg.n))
    log.info("%d prompts x %d samples; %d real val images at %d px", len(entries), cfg.n, len(real), pipe.image_size)
    return ImageContext(pipe, entries, classifier, real)


def image_metrics_for(context: ImageContext, prior, cfg: DictConfig, prior_settings: dict) -> dict:
    pipe = with_prior(context.pipe, prior)
    return evaluate_images(pipe, context.entries, int(cfg.n), int(cfg.seed), context.classifier, context.real_images,
                           prior_settings, settings_of(cfg.decoder_settings), int(cfg.batch_size))


# ---------------------------------------------------------------------------------- mode=images


def run_images(cfg: DictConfig, clip) -> dict:
    context = image_context(cfg, clip)
    prior = load_prior(cfg.prior, clip, cfg.paths.artifacts, cfg.data.cache_dir)
    settings = settings_of(cfg.prior_settings)
    metrics = image_metrics_for(context, prior, cfg, settings)
    result = {"prior": prior.kind, "checkpoint": prior.checkpoint_path, "decoder": context.pipe.decoder.checkpoint_path,
              "prior_settings": settings, "decoder_settings": settings_of(cfg.decoder_settings), "suite": cfg.suite,
              "n_prompts": len(context.entries), "n": int(cfg.n), "seed": int(cfg.seed), "metrics": metrics}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "images.json").write_text(json.dumps(json_safe(result), indent=1))
    table = markdown([{"prior": prior.kind, "settings": label(settings), **metrics}],
                     ["prior", "settings", "n_images", *IMAGE_COLUMNS, "attr_acc_single", "attr_acc_two", "attr_acc_variant"])
    (out / "images.md").write_text(table)
    print(table)
    return result


# ----------------------------------------------------------------------------- mode=leaderboard


def prior_sweep_rows(prior, pools: dict, cfg: DictConfig, image_setting: dict) -> list[dict]:
    """Prior metrics of one trained prior over its sweep, and at its image setting when that is not swept."""
    settings = sweep_settings(plain(cfg.sweep), prior.kind)
    if image_setting not in settings:
        settings.append(image_setting)
    rows = []
    for setting in settings:
        log.info("leaderboard: %s %s", prior.kind, label(setting))
        metrics = evaluate_prior(prior, pools, int(cfg.seed), setting)
        rows.append({"prior": prior.kind, "settings": label(setting), "guidance_scale": setting.get("guidance_scale"),
                     "steps": setting.get("steps"), "ms_per_sample": metrics["s_per_1k"],  # s / 1,000 = ms / 1
                     "image_setting": setting == image_setting, **metrics})
    return rows


def grid_pixels(context: ImageContext, prior, cfg: DictConfig, prior_settings: dict) -> torch.Tensor:
    """``grid_n`` samples of each of ``grid_prompts`` suite prompts: the same prompts and seed for every prior."""
    entries = spread_subset(context.entries, int(cfg.grid_prompts))
    prompts = repeat(entries, "prompt", int(cfg.grid_n))
    pipe = with_prior(context.pipe, prior)
    z_img, _ = sample_embeddings(pipe, prompts, int(cfg.seed), prior_settings, int(cfg.batch_size))
    pixels, _ = decode_embeddings(pipe, z_img, prompts, int(cfg.seed), settings_of(cfg.decoder_settings), int(cfg.batch_size))
    return pixels


def leaderboard_prior(spec, context: ImageContext, pools: dict, baselines: dict, cfg: DictConfig, clip):
    """One leaderboard entry: (prior-metric rows, image-metric row, grid pixels)."""
    prior = load_prior(spec, clip, cfg.paths.artifacts, cfg.data.cache_dir)
    if prior.kind in BASELINES:
        image_setting = {}
        rows = [{**baselines[prior.kind], "guidance_scale": None, "steps": None, "ms_per_sample": 0.0, "image_setting": True}]
    else:
        image_setting = settings_of(cfg.image_setting.get(prior.kind))
        rows = prior_sweep_rows(prior, pools, cfg, image_setting)
    log.info("leaderboard: image metrics of %s at %s", prior.kind, label(image_setting))
    metrics = image_metrics_for(context, prior, cfg, image_setting)
    chosen = next(r for r in rows if r["image_setting"])
    image_row = {"prior": prior.kind, "settings": chosen["settings"], "ms_per_sample": chosen["ms_per_sample"],
                 "cos_true": chosen["cos_true"], "cos_true_unseen": chosen.get("cos_true_unseen", math.nan), **metrics}
    chosen.update({k: metrics[k] for k in IMAGE_COLUMNS})
    return rows, image_row, grid_pixels(context, prior, cfg, image_setting)


def run_leaderboard(cfg: DictConfig, clip) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data, _convert_="all", train=cfg.data.val, batch_size=cfg.data.val_batch_size)
    pools = val_pool(datamodule, int(cfg.pool))
    baselines = {r["prior"]: r for r in baseline_rows(pools, cfg.data.cache_dir)}
    context = image_context(cfg, clip)
    prior_rows, image_rows, grids = [], [], {}
    for spec in [*BASELINES, *cfg.priors]:
        rows, image_row, pixels = leaderboard_prior(spec, context, pools, baselines, cfg, clip)
        if image_row["prior"] in grids:
            raise ValueError(f"prior kind {image_row['prior']} appears twice in priors={list(cfg.priors)}; "
                             f"the leaderboard keys rows by kind")
        prior_rows += rows
        image_rows.append(image_row)
        grids[image_row["prior"]] = pixels
        save_grid(pixels, int(cfg.grid_n), out / f"grid_{image_row['prior']}.png")
    write_leaderboard(prior_rows, image_rows, out)
    grid_entries = spread_subset(context.entries, int(cfg.grid_prompts))
    grids_figure(grids, [e["prompt"] for e in grid_entries], int(cfg.grid_n), out / "grids.png")
    if cfg.wandb:
        mode = None
        for image_row in image_rows:
            kind = image_row["prior"]
            mode = log_wandb(cfg, kind, [r for r in prior_rows if r["prior"] == kind], image_row, out / f"grid_{kind}.png", mode)
    return {"prior_rows": prior_rows, "image_rows": image_rows}


def summary(rows: list[dict], image_row: dict) -> dict:
    """The same keys for every prior (baselines included): its image-setting row's prior metrics, its image
    metrics, and the best cos_true of its sweep."""
    chosen = next(r for r in rows if r["image_setting"])
    out = {"settings": chosen["settings"], "ms_per_sample": chosen["ms_per_sample"]}
    out.update({k: chosen.get(k, math.nan) for k in PRIOR_COLUMNS})
    out.update({k: image_row.get(k, math.nan) for k in (*IMAGE_COLUMNS, "attr_shape", "attr_color", "n_images")})
    out["best_cos_true"] = max(r["cos_true"] for r in rows)
    out["best_cos_true_unseen"] = max(r.get("cos_true_unseen", math.nan) for r in rows)
    return out


def log_wandb(cfg: DictConfig, kind: str, rows: list[dict], image_row: dict, grid: Path, mode: str | None = None) -> str | None:
    """One wandb run per prior, all in one group: the sweep as a table and as steps, the grid, the summary.
    ``mode``: wandb's mode (None: ``cfg.wandb_mode``, else WANDB_MODE). Returns the mode that worked, so a
    fallback to offline is taken once, not once per prior."""
    import wandb

    options = dict(project=cfg.wandb_project, group=cfg.wandb_group, name=kind, job_type="leaderboard",
                   dir=str(cfg.out), reinit="finish_previous",
                   config={"prior": kind, "pool": int(cfg.pool), "seed": int(cfg.seed), "n": int(cfg.n),
                           "suite": cfg.suite, "suite_limit": cfg.suite_limit, "decoder": str(cfg.decoder),
                           "decoder_settings": settings_of(cfg.decoder_settings)})
    mode = mode or cfg.wandb_mode or None
    try:
        run = wandb.init(mode=mode, **options)
    except wandb.errors.Error as error:  # not logged in, or no network: the tables are written already
        log.warning("wandb could not log online (%s); logging the leaderboard offline under %s "
                    "(`wandb sync` it later)", error, cfg.out)
        mode = "offline"
        run = wandb.init(mode=mode, **options)
    columns = ["settings", "guidance_scale", "steps", "ms_per_sample", *PRIOR_COLUMNS]
    run.log({"sweep": wandb.Table(columns=columns, data=[[r.get(k) for k in columns] for r in rows]),
             "grid": wandb.Image(str(grid))})
    for row in rows:
        run.log({f"sweep/{k}": row[k] for k in ("ms_per_sample", *PRIOR_COLUMNS) if k in row})
    run.summary.update(summary(rows, image_row))
    run.finish()
    return mode


# --------------------------------------------------------------------------------------- writing


def json_safe(value):
    """NaN as null (JSON has no NaN); tensors and numpy numbers as plain numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_leaderboard(prior_rows: list[dict], image_rows: list[dict], out: Path) -> None:
    prior_keys = ["prior", "settings", "ms_per_sample", *PRIOR_COLUMNS]
    image_keys = ["prior", "settings", "ms_per_sample", "cos_true", *IMAGE_COLUMNS, "n_images"]
    text = ("## Prior metrics (val pools; ms per sample of the prior alone)\n\n" + markdown(prior_rows, prior_keys)
            + "\n## Image metrics (prompt suite through one decoder; ms per image of prior + decoder)\n\n"
            + markdown(image_rows, image_keys))
    (out / "leaderboard.md").write_text(text)
    print(text)
    write_csv(prior_rows, ["prior", "settings", "guidance_scale", "steps", "ms_per_sample", *PRIOR_COLUMNS,
                           "image_setting", *IMAGE_COLUMNS], out / "leaderboard.csv")
    (out / "leaderboard.json").write_text(json.dumps(json_safe({"prior_rows": prior_rows, "image_rows": image_rows}), indent=1))
    plot_cost(prior_rows, out / "leaderboard_cost.png")
    plot_steps(prior_rows, out / "leaderboard_steps.png")


# ----------------------------------------------------------------------------------- mode=steps


STEPS_KEYS = ["sweep", "sampler", "steps", "prior_settings", "decoder_settings", "ms_per_image", "ms_prior", "ms_decode",
              "attr_acc", "attr_acc_seen", "attr_acc_unseen", "attr_prompt", "clip_score", "fd_clip", "n_images"]


def run_steps(cfg: DictConfig, clip) -> list[dict]:
    context = image_context(cfg, clip)
    prior = load_prior(cfg.prior, clip, cfg.paths.artifacts, cfg.data.cache_dir)
    pipe = with_prior(context.pipe, prior)
    rows = steps_sweep(pipe, context.entries, int(cfg.n), int(cfg.seed), context.classifier, list(cfg.prior_steps),
                       list(cfg.decoder_steps), bool(cfg.decoder_ddpm), settings_of(cfg.prior_settings),
                       settings_of(cfg.decoder_settings), context.real_images, int(cfg.batch_size))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, STEPS_KEYS, out / "steps.csv")
    table = markdown(rows, STEPS_KEYS)
    (out / "steps.md").write_text(f"prior {prior.kind}, {len(context.entries)} prompts x {cfg.n} samples, seed {cfg.seed}\n\n" + table)
    print(table)
    plot_quality_vs_steps(rows, out / "steps.png")
    return rows
