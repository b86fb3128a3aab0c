"""Priors side by side on their prior metrics (``mode=prior`` for one, ``mode=compare`` for several): the
baselines, then each prior at each of its ``eval.settings``. Writes ``results.csv``, ``results.md`` and
``cost.png`` (cos_true against seconds per 1,000 samples) to ``out`` and prints the table."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from unclip.eval.plots import plot_compare
from unclip.eval.protocol import COLUMNS, SPLITS, baseline_rows, evaluate_prior, val_pool
from unclip.eval.settings import eval_settings, label
from unclip.eval.tables import markdown, write_csv
from unclip.loading import load

log = logging.getLogger(__name__)


def run_compare(cfg: DictConfig, clip) -> list[dict]:
    specs = [cfg.prior] if cfg.mode == "prior" else list(cfg.priors)
    datamodule = instantiate(cfg.data, _convert_="all", train=cfg.data.val, batch_size=cfg.data.val_batch_size)
    pools = val_pool(datamodule, int(cfg.pool))
    rows = baseline_rows(pools, cfg.data.cache_dir)
    for spec in specs:
        module = load(spec, clip=clip, artifacts=cfg.paths.artifacts)
        for setting in eval_settings(module, cfg)["settings"]:
            log.info("%s %s", spec, setting)
            row = evaluate_prior(module, pools, int(cfg.seed), setting)
            rows.append({"prior": module.kind, "settings": label(setting), **row})
    write(rows, Path(cfg.out))
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["prior", "settings", "s_per_1k"] + [f"{c}{s}" for s in SPLITS.values() for c in COLUMNS]
    write_csv(rows, keys, out / "results.csv")
    table = markdown(rows, keys, lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v)))
    (out / "results.md").write_text(table)
    print(table, end="")
    plot_compare(rows, out / "cost.png")
