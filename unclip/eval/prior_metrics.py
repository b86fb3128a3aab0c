"""Metrics shared by every prior (and, later, the decoder): one protocol, one set of names.

The prior "cosine suite" (as in the DALLE2-pytorch/LAION prior trainings) over a pool of val pairs:
``cos_true`` cos(ẑ_i, z_i); ``cos_text`` cos(ẑ_i, z_t); ``cos_unrelated`` cos(ẑ_i, z_t of another caption,
the pool rolled by one: high means the caption is ignored); ``baseline_cos`` cos(z_t, z_i) of the data;
``cos_text_minus_baseline``; ``retrieval_top1``: ẑ_i retrieves its own caption's true z_i in the pool;
``fd_img``: Fréchet distance between the pool's ẑ_i and its true z_i (unit-normalised), i.e. whether the
prior's samples are distributed like image embeddings. cos_true alone rewards regressing to the
conditional mean (a point estimate beats any sample of p(z_i | y) on it); fd_img penalises the
collapsed spread that such an estimate has, which is what the decoder would be fed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRIOR_KEYS = ("cos_true", "cos_text", "cos_unrelated", "baseline_cos", "cos_text_minus_baseline", "retrieval_top1", "fd_img")
BASELINES = ("baseline_zt", "baseline_linear")


def prior_metrics(z_pred: torch.Tensor, z_img: torch.Tensor, z_txt: torch.Tensor) -> dict[str, float]:
    """z_pred, z_img, z_txt: (N, D) CLIP embeddings (any scale); pairs share a row."""
    from unclip.eval.image_metrics import frechet_distance  # torchmetrics' FID: loaded only when metrics are computed

    z_pred, z_img, z_txt = (F.normalize(z.float(), dim=-1) for z in (z_pred, z_img, z_txt))
    cos_text = (z_pred * z_txt).sum(-1).mean()
    baseline = (z_txt * z_img).sum(-1).mean()
    retrieved = (z_pred @ z_img.T).argmax(-1)
    return {
        "cos_true": float((z_pred * z_img).sum(-1).mean()),
        "cos_text": float(cos_text),
        "cos_unrelated": float((z_pred * z_txt.roll(1, 0)).sum(-1).mean()),
        "baseline_cos": float(baseline),
        "cos_text_minus_baseline": float(cos_text - baseline),
        "retrieval_top1": float((retrieved == torch.arange(len(z_img), device=z_img.device)).float().mean()),
        "fd_img": frechet_distance(z_img, z_pred) if len(z_img) > 1 else float("nan"),
    }


def baseline_predictions(z_txt: torch.Tensor, linear_weight: torch.Tensor, linear_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """The two reference 'priors' every prior is compared with: z_t itself, and the linear map."""
    return {"baseline_zt": z_txt, "baseline_linear": z_txt.float() @ linear_weight + linear_bias}
