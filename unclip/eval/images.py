"""Priors judged by the images they lead to: prompt suite -> prior -> one shared decoder -> the attribute
classifier, CLIP score against the prompts and FD_CLIP against real val images (``mode=images``).

Scores are overall and per group of suite entries (:data:`GROUPS`: ``seen`` / ``unseen`` = entries tagged
``holdout``; ``single`` / ``two`` / ``variant``). ``prior`` may also be ``baseline_zt`` or
``baseline_linear``. Writes ``images.json`` and ``images.md``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from unclip.eval.attributes import load_classifier, predict, score_predictions
from unclip.eval.baselines import load_prior
from unclip.eval.generation import decode_embeddings, sample_embeddings, timings, with_prior
from unclip.eval.image_metrics import clip_scores, fd_clip
from unclip.eval.prompt_suites import repeat, suite_entries
from unclip.eval.protocol import val_pool
from unclip.eval.settings import label, settings_of
from unclip.eval.tables import json_safe, markdown
from unclip.loading import load
from unclip.pipeline import UnCLIPPipeline

log = logging.getLogger(__name__)

# subsets of the prompt suite scored on their own, by the entries' tags
GROUPS: dict[str, Callable[[Sequence[str]], bool]] = {
    "seen": lambda tags: "holdout" not in tags,
    "unseen": lambda tags: "holdout" in tags,
    "single": lambda tags: "single" in tags,
    "two": lambda tags: "two" in tags,
    "variant": lambda tags: "variant" in tags,
}
IMAGE_COLUMNS = ["ms_per_image", "attr_acc", "attr_acc_seen", "attr_acc_unseen", "attr_prompt", "clip_score",
                 "clip_score_seen", "clip_score_unseen", "fd_clip"]


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
        metrics[f"attr_acc_{group}"] = score_predictions(predictions.subset(rows), [objects[i] for i in rows])["attr_acc"]
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
    pipe = UnCLIPPipeline(clip, decoder, None, upsamplers, precision=cfg.get("precision", "32-true"))
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
