"""Quality against sampling steps (``mode=steps``): attribute accuracy, CLIP score and latency against
(a) the prior's DDIM steps at fixed decoder settings and (b) the decoder's DDIM steps, plus ancestral DDPM
on the full chain, at a fixed prior setting (one ẑ_i set shared by every decoder setting). Writes
``steps.{csv,md,png}``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig

from unclip.eval.baselines import has_steps, load_prior
from unclip.eval.generation import check_decoder_settings, decode_embeddings, sample_embeddings, timings, with_prior
from unclip.eval.images import evaluate_images, image_context, score_images
from unclip.eval.plots import plot_quality_vs_steps
from unclip.eval.prompt_suites import repeat
from unclip.eval.settings import label, settings_of
from unclip.eval.tables import markdown, write_csv
from unclip.pipeline import UnCLIPPipeline

log = logging.getLogger(__name__)


FAST_SOLVERS = ("dpmpp_2m", "unipc")  # multistep solvers, run on trailing timesteps (Lin et al. 2023)


def steps_spec(sampler: str, steps: int) -> int | str:
    """The respacing a sampler is swept on: N strided steps for DDIM, trailing N for the fast solvers
    (their last step then lands on the data, not beside it: see conf/sampler/dpmpp_2m.yaml)."""
    return f"trailing{steps}" if sampler in FAST_SOLVERS else int(steps)


def steps_sweep(pipe: UnCLIPPipeline, entries: list[dict], n: int, seed: int, classifier, prior_steps: Sequence[int],
                decoder_steps: Sequence[int], decoder_ddpm: bool = False, prior_settings: dict | None = None,
                decoder_settings: dict | None = None, real_images: torch.Tensor | None = None,
                batch_size: int = 64, samplers: Sequence[str] = ("ddim",)) -> list[dict]:
    """Image quality and latency against sampling steps, for each of ``samplers``: one row per prior step
    count (decoder at ``decoder_settings``), then one per decoder step count and, with ``decoder_ddpm``, one
    for ancestral DDPM over the decoder's whole training chain (prior at ``prior_settings``, its ẑ_i drawn
    once, so the rows differ by the decoder alone)."""
    prior_settings, decoder_settings = dict(prior_settings or {}), check_decoder_settings(dict(decoder_settings or {}))
    if prior_steps and not has_steps(pipe.prior):
        raise ValueError(f"prior {pipe.prior.kind} has no sampling steps to sweep; set prior_steps=[]")
    rows = []
    for sampler in samplers:
        for steps in prior_steps:
            setting = {**prior_settings, "sampler": sampler, "steps": steps_spec(sampler, steps)}
            log.info("steps sweep: prior %s", label(setting))
            metrics = evaluate_images(pipe, entries, n, seed, classifier, real_images, setting, decoder_settings, batch_size)
            rows.append({"sweep": "prior", "sampler": sampler, "steps": int(steps), "prior": pipe.prior.kind,
                         "prior_settings": label(setting), "decoder_settings": label(decoder_settings), **metrics})
    prompts = repeat(entries, "prompt", n)
    z_img, prior_seconds = sample_embeddings(pipe, prompts, seed, prior_settings, batch_size)
    chains = [(sampler, int(s)) for sampler in samplers for s in decoder_steps]
    chains += [("ddpm", pipe.decoder.diffusion.num_timesteps)] if decoder_ddpm else []
    for sampler, steps in chains:
        setting = {**decoder_settings, "sampler": sampler, "steps": steps_spec(sampler, steps)}
        log.info("steps sweep: decoder %s", label(setting))
        pixels, decode_seconds = decode_embeddings(pipe, z_img, prompts, seed, setting, batch_size)
        metrics = score_images(pixels, entries, n, pipe.clip, classifier, real_images)
        rows.append({"sweep": "decoder", "sampler": sampler, "steps": steps, "prior": pipe.prior.kind,
                     "prior_settings": label(prior_settings), "decoder_settings": label(setting), **metrics,
                     **timings(prior_seconds, decode_seconds, len(prompts))})
    return rows


STEPS_KEYS = ["sweep", "sampler", "steps", "prior_settings", "decoder_settings", "ms_per_image", "ms_prior", "ms_decode",
              "attr_acc", "attr_acc_seen", "attr_acc_unseen", "attr_prompt", "clip_score", "fd_clip", "n_images"]


def run_steps(cfg: DictConfig, clip) -> list[dict]:
    context = image_context(cfg, clip)
    prior = load_prior(cfg.prior, clip, cfg.paths.artifacts, cfg.data.cache_dir)
    pipe = with_prior(context.pipe, prior)
    rows = steps_sweep(pipe, context.entries, int(cfg.n), int(cfg.seed), context.classifier, list(cfg.prior_steps),
                       list(cfg.decoder_steps), bool(cfg.decoder_ddpm), settings_of(cfg.prior_settings),
                       settings_of(cfg.decoder_settings), context.real_images, int(cfg.batch_size),
                       list(cfg.get("samplers") or ["ddim"]))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, STEPS_KEYS, out / "steps.csv")
    table = markdown(rows, STEPS_KEYS)
    (out / "steps.md").write_text(f"prior {prior.kind}, {len(context.entries)} prompts x {cfg.n} samples, seed {cfg.seed}\n\n" + table)
    print(table)
    plot_quality_vs_steps(rows, out / "steps.png")
    return rows
