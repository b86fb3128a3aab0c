"""The leaderboard on wandb: one run per prior, all in one group, so a dashboard compares them."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from omegaconf import DictConfig

from unclip.eval.images import IMAGE_COLUMNS
from unclip.eval.protocol import PRIOR_COLUMNS
from unclip.eval.settings import settings_of

log = logging.getLogger(__name__)


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
