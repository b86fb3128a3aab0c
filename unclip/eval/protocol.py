"""The one evaluation protocol every prior shares: the same val pools (the first ``pool`` rows of each val
split, exact mode), the same seeds, the metric names validation logs (``val/prior/*``), and the two
baseline rows (ẑ_i = z_t, and the ridge map z_t -> z_i fit on train)."""

from __future__ import annotations

import time

import torch

from unclip.data import cache as cache_lib
from unclip.eval.prior_metrics import baseline_predictions, prior_metrics
from unclip.seeding import hash_seed

SPLITS = {"val": "", "val_unseen": "_unseen"}
COLUMNS = ("cos_true", "cos_text", "cos_unrelated", "cos_text_minus_baseline", "retrieval_top1", "fd_img")
PRIOR_COLUMNS = [f"{c}{s}" for s in SPLITS.values() for c in COLUMNS]


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
