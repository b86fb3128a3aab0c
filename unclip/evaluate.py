"""One evaluation protocol for every prior: the same val pairs, the same seeds, the same metric names as
validation (``val/prior/*``), several sampling settings per prior, and the two baseline rows.

    python -m unclip.evaluate mode=prior prior=diffusion
    python -m unclip.evaluate mode=compare priors=[diffusion,ar]   # or checkpoint paths

Writes ``results.csv``, ``results.md`` and ``cost.png`` (cos_true against seconds per 1,000 samples) to
``out`` and prints the table. The image-level modes live in :mod:`unclip.leaderboard`:

    python -m unclip.evaluate mode=images prior=diffusion decoder=decoder n=2
    python -m unclip.evaluate leaderboard priors=[diffusion,ar,contrastive]   # a bare first word is the mode
    python -m unclip.evaluate mode=steps prior=diffusion decoder=decoder
"""

from __future__ import annotations

import csv
import logging
import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unclip.data import cache as cache_lib
from unclip.data.datamodule import hash_seed
from unclip.loading import load
from unclip.metrics import baseline_predictions, prior_metrics

log = logging.getLogger(__name__)
SPLITS = {"val": "", "val_unseen": "_unseen"}
MODES = ("prior", "compare", "images", "leaderboard", "steps")
COLUMNS = ("cos_true", "cos_text", "cos_unrelated", "cos_text_minus_baseline", "retrieval_top1", "fd_img")


def val_pool(datamodule, pool: int, splits=tuple(SPLITS)) -> dict[str, list[dict]]:
    """The first ``pool`` rows of each val split, as batches (exact mode: always the same rows)."""
    datamodule.setup()
    out = {}
    for split in splits:
        if split not in datamodule.datasets:
            continue
        batches, rows = [], 0
        for batch in datamodule.loader(split):
            batches.append(head(batch, pool - rows))
            rows += len(batches[-1]["key"])
            if rows >= pool:
                break
        out[split] = batches
    return out


def head(batch: dict, n: int) -> dict:
    """The first ``n`` rows of a batch (tensors and lists alike)."""
    return {k: (v[:n] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}


def evaluate_prior(module, pools: dict, seed: int, settings: dict) -> dict:
    """Metrics per split for one prior at one sampling setting, plus seconds per 1,000 samples."""
    row, elapsed, count = {}, 0.0, 0
    for split, batches in pools.items():
        preds, imgs, txts = [], [], []
        for index, batch in enumerate(batches):
            cond = module.condition(batch)
            generator = torch.Generator(device=module.device).manual_seed(hash_seed(seed, split, index))
            start = time.perf_counter()
            preds.append(module.sample(cond, generator, **settings).float())
            elapsed += time.perf_counter() - start
            count += len(batch["key"])
            imgs.append(batch["img_emb"].float())
            txts.append(batch["txt_emb"].float())
        metrics = prior_metrics(torch.cat(preds), torch.cat(imgs), torch.cat(txts))
        row.update({f"{k}{SPLITS[split]}": v for k, v in metrics.items()})
    row["s_per_1k"] = 1000 * elapsed / max(count, 1)
    return row


def baseline_rows(pools: dict, cache_dir: str) -> list[dict]:
    stats = cache_lib.load_stats(cache_dir)
    weight, bias = torch.as_tensor(stats["linear_weight"]), torch.as_tensor(stats["linear_bias"])
    rows = {name: {"prior": name, "settings": "-", "s_per_1k": 0.0} for name in ("baseline_zt", "baseline_linear")}
    for split, batches in pools.items():
        z_img = torch.cat([b["img_emb"].float() for b in batches])
        z_txt = torch.cat([b["txt_emb"].float() for b in batches])
        for name, pred in baseline_predictions(z_txt, weight, bias).items():
            rows[name].update({f"{k}{SPLITS[split]}": v for k, v in prior_metrics(pred, z_img, z_txt).items()})
    return list(rows.values())


@torch.no_grad()
def run(cfg: DictConfig) -> list[dict]:
    if cfg.mode not in MODES:
        raise ValueError(f"unknown evaluate mode {cfg.mode!r}; choose among {', '.join(MODES)}")
    clip = instantiate(cfg.clip, _convert_="all")  # the run's CLIP; load() refuses a prior trained with another
    if cfg.mode in ("images", "leaderboard", "steps"):
        from unclip import leaderboard

        return {"images": leaderboard.run_images, "leaderboard": leaderboard.run_leaderboard,
                "steps": leaderboard.run_steps}[cfg.mode](cfg, clip)
    specs = [cfg.prior] if cfg.mode == "prior" else list(cfg.priors)
    datamodule = instantiate(cfg.data, _convert_="all", train=cfg.data.val, batch_size=cfg.data.val_batch_size)
    pools = val_pool(datamodule, int(cfg.pool))
    rows = baseline_rows(pools, cfg.data.cache_dir)
    settings = OmegaConf.to_container(cfg.settings, resolve=True)
    for spec in specs:
        module = load(spec, clip=clip, artifacts=cfg.paths.artifacts)
        for setting in settings.get(module.kind, [{}]):
            log.info("%s %s", spec, setting)
            row = evaluate_prior(module, pools, int(cfg.seed), setting)
            rows.append({"prior": module.kind, "settings": " ".join(f"{k}={v}" for k, v in setting.items()) or "default", **row})
    write(rows, Path(cfg.out))
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = ["prior", "settings", "s_per_1k"] + [f"{c}{s}" for s in SPLITS.values() for c in COLUMNS]
    write_csv(rows, keys, out / "results.csv")
    table = markdown(rows, keys, lambda v: f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v)))
    (out / "results.md").write_text(table)
    print(table, end="")
    plot(rows, out / "cost.png")


def cell(value) -> str:
    """A table cell: "-" for a missing number, 3 decimals below 100 and 1 above."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict], keys: Sequence[str], fmt: Callable = cell) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], keys: Sequence[str], path: Path) -> None:
    """The rows' ``keys`` (missing ones and None as empty cells)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["prior"] for r in rows if not r["prior"].startswith("baseline")):
        points = [r for r in rows if r["prior"] == kind]
        ax.scatter([r["s_per_1k"] for r in points], [r["cos_true"] for r in points], label=kind)
        for r in points:
            ax.annotate(r["settings"], (r["s_per_1k"], r["cos_true"]), fontsize=6)
    for r in rows:
        if r["prior"].startswith("baseline"):
            ax.axhline(r["cos_true"], linestyle="--", linewidth=1, color="grey")
            ax.annotate(r["prior"], (0, r["cos_true"]), fontsize=7, color="grey")
    ax.set_xlabel("seconds per 1,000 samples")
    ax.set_ylabel("val cos(ẑ_i, z_i)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mode_word_as_override(argv: list[str]) -> list[str]:
    """``python -m unclip.evaluate leaderboard ...`` -> ``... mode=leaderboard ...``: a bare first argument
    (no ``=``, not a flag) names the mode; Hydra itself would reject it."""
    if len(argv) < 2 or "=" in argv[1] or argv[1].startswith(("-", "+", "~")):
        return list(argv)
    if argv[1] not in MODES:
        raise SystemExit(f"unknown evaluate mode {argv[1]!r}; choose among {', '.join(MODES)} (or pass mode=...)")
    return [argv[0], f"mode={argv[1]}", *argv[2:]]


@hydra.main(config_path="../conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv = mode_word_as_override(sys.argv)
    main()
