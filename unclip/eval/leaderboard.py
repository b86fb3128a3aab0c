"""The prior leaderboard (``mode=leaderboard``): the two baselines and every prior on the same val pools and
seeds. Each prior is swept over its ``eval.sweep`` (guidance scales, and steps where it has them) for the
prior metrics with ms per sample; then its ``eval.image_setting`` is decoded through one decoder for the
image metrics. Writes ``leaderboard.{md,csv,json}``, ``leaderboard_cost.png``, ``leaderboard_steps.png``,
``grid_<prior>.png`` and ``grids.png``; logs one wandb run per prior in one group (``wandb=false`` to skip).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from unclip.eval.baselines import load_prior
from unclip.eval.generation import decode_embeddings, sample_embeddings, with_prior
from unclip.eval.images import IMAGE_COLUMNS, ImageContext, image_context, image_metrics_for
from unclip.eval.plots import grids_figure, plot_cost, plot_steps
from unclip.eval.prior_metrics import BASELINES
from unclip.eval.prompt_suites import repeat, spread_subset
from unclip.eval.protocol import PRIOR_COLUMNS, baseline_rows, evaluate_prior, val_pool
from unclip.eval.settings import eval_settings, label, settings_of, sweep_settings
from unclip.eval.tables import json_safe, markdown, write_csv
from unclip.eval.wandb_logging import log_wandb
from unclip.sampling import save_grid

log = logging.getLogger(__name__)


def prior_sweep_rows(prior, pools: dict, cfg: DictConfig, image_setting: dict) -> list[dict]:
    """Prior metrics of one trained prior over its sweep, and at its image setting when that is not swept."""
    settings = sweep_settings(eval_settings(prior, cfg)["sweep"])
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
        image_setting = eval_settings(prior, cfg)["image_setting"]
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
