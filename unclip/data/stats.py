"""Statistics of an embedding cache, fit on its train shards once and saved as ``stats.npz``: the
normalisation of z_i and z_t, the PCA of z_i (what the AR prior tokenises) and the ridge map z_t -> z_i
(the linear baseline prior)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unclip.data import cache as cache_lib

STATS_VERSION = 2  # bump when compute_stats gains an entry: caches recompute their stats on the next embed run


def fit_linear_map(z_txt: np.ndarray, z_img: np.ndarray, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression z_i ≈ z_t W + b on train pairs: the 'linear map' baseline prior."""
    z_txt, z_img = z_txt.astype(np.float64), z_img.astype(np.float64)
    mean_t, mean_i = z_txt.mean(0), z_img.mean(0)
    xt, yi = z_txt - mean_t, z_img - mean_i
    gram = xt.T @ xt
    weight = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)), xt.T @ yi)
    return weight.astype(np.float32), (mean_i - mean_t @ weight).astype(np.float32)


def compute_stats(cache_dir: Path, shards: list[str]) -> dict[str, np.ndarray]:
    """Per-dimension mean/std of z_i and z_t, the PCA of z_i (what the AR prior tokenises) and the
    linear map z_t -> z_i (a baseline prior), from train shards."""
    img, txt = [], []
    for name in shards:
        table = cache_lib.read_cache_shard(str(cache_dir / name), ("img_emb", "txt_emb"))
        if not len(table["keys"]):  # an empty source shard: nothing to fit, and its arrays have no width
            continue
        img.append(table["img_emb"].astype(np.float64))
        txt.append(table["txt_emb"].astype(np.float64))
    z_img, z_txt = np.concatenate(img), np.concatenate(txt)
    linear_weight, linear_bias = fit_linear_map(z_txt, z_img)
    centred = z_img - z_img.mean(0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    variance = singular**2 / max(1, len(z_img) - 1)
    return {
        "img_mean": z_img.mean(0).astype(np.float32), "img_std": z_img.std(0).astype(np.float32),
        "txt_mean": z_txt.mean(0).astype(np.float32), "txt_std": z_txt.std(0).astype(np.float32),
        "pca_mean": z_img.mean(0).astype(np.float32), "pca_components": components.astype(np.float32),  # (k, D) rows
        "pca_explained_variance": variance.astype(np.float32),
        "pca_explained_ratio": (variance / variance.sum()).astype(np.float32),
        "linear_weight": linear_weight, "linear_bias": linear_bias,  # the linear z_t -> z_i baseline prior
        "baseline_cos": np.float32(np.mean(np.sum(z_img * z_txt, -1) / (np.linalg.norm(z_img, axis=-1) * np.linalg.norm(z_txt, axis=-1)))),
    }
