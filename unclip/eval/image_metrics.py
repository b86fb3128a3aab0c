"""Image metrics in the run's own CLIP space, through torchmetrics: CLIP score and Fréchet distance.

* ``clip_score``: ``100 * max(cos(z_i(x), z_t(prompt)), 0)`` per image, averaged; the definition of
  torchmetrics' ``CLIPScore`` (Hessel et al. 2021 without the 2.5 rescaling), computed with the
  project's :class:`~unclip.clip.FrozenCLIP` instead of a Hugging Face model (which would need a
  download). Logged as ``val/clip_score``.
* ``fd_clip``: the Fréchet distance between Gaussians fit to the CLIP image embeddings of two image sets
  (FID's formula, Heusel et al. 2017, with the CLIP image tower in place of Inception), computed by
  torchmetrics' ``FrechetInceptionDistance`` with a custom ``feature`` module. Embeddings are the
  normalised z_i, so the distance is on the unit sphere's scale (0 = same distribution, values ≪ 4).
  Logged as ``val/fd_clip``. It needs more images than embedding dimensions for a full-rank covariance;
  with fewer it is still a consistent comparison at a fixed set size, but biased upwards.
* ``inception_metrics``: Inception FID/KID only where torch-fidelity and its Inception weights are on
  disk; otherwise ``None`` and a logged note. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image.fid import FrechetInceptionDistance

log = logging.getLogger(__name__)

# torch-fidelity's Inception weights, as its own downloader names them under torch.hub's cache
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


# ------------------------------------------------------------------------------------ CLIP score


def clip_score_embeddings(z_img: torch.Tensor, z_txt: torch.Tensor) -> torch.Tensor:
    """z_img, z_txt: (N, D) paired embeddings (any scale) -> (N,) scores ``100 * max(cos, 0)``."""
    if z_img.shape != z_txt.shape:
        raise ValueError(f"clip score needs paired embeddings of one shape, got images {tuple(z_img.shape)} and texts {tuple(z_txt.shape)}")
    cos = (F.normalize(z_img.float(), dim=-1) * F.normalize(z_txt.float(), dim=-1)).sum(-1)
    return 100 * cos.clamp(min=0)


@torch.no_grad()
def clip_scores(clip, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    """(N,) CLIP scores ``100 * max(cos, 0)`` of images (N, 3, H, W) in [-1, 1] against their prompts (N
    strings), one per image so callers can average over any subset, with the run's FrozenCLIP (any
    resolution: it resizes to its own)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
    scores = [clip_score_embeddings(clip.encode_image(images[i:i + batch_size]),
                                    clip.encode_text(list(prompts[i:i + batch_size])).z_txt).cpu()
              for i in range(0, len(images), batch_size)]
    return torch.cat(scores) if scores else torch.zeros(0)


def clip_score(clip, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 256) -> float:
    """Mean CLIP score of images against their prompts (:func:`clip_scores`); NaN for no images."""
    scores = clip_scores(clip, images, prompts, batch_size)
    return float(scores.mean()) if len(scores) else float("nan")


# ---------------------------------------------------------------------------- Fréchet distance


class CLIPImageFeature(nn.Module):
    """torchmetrics' custom-feature hook: images (B, 3, H, W) in [-1, 1] -> normalised z_i (B, D).

    The FrozenCLIP is held as a plain attribute (it is not an ``nn.Module`` on purpose), so the metric
    neither registers nor moves nor saves its weights."""

    def __init__(self, clip, batch_size: int = 256):
        super().__init__()
        self.clip, self.batch_size = clip, batch_size
        self.num_features = int(clip.embed_dim)  # read by FrechetInceptionDistance instead of a dummy forward

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.clip.encode_image(images[i:i + self.batch_size]) for i in range(0, len(images), self.batch_size)])


class EmbeddingFeature(nn.Module):
    """The identity as a torchmetrics feature: ``update`` takes embeddings (B, D) already computed
    (e.g. the z_i a validation step has at hand) instead of images."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = int(dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[-1] != self.num_features:
            raise ValueError(f"expected embeddings (B, {self.num_features}), got {tuple(z.shape)}")
        return z.float()


def fd_clip_metric(clip) -> FrechetInceptionDistance:
    """A torchmetrics Fréchet distance in CLIP image-embedding space, to accumulate over batches:
    ``update(images in [-1, 1], real=True|False)``, then ``compute()``. ``reset()`` keeps the real
    side (``reset_real_features=False``), so fixed val images are embedded once per run."""
    return FrechetInceptionDistance(feature=CLIPImageFeature(clip), reset_real_features=False)


def embedding_fd_metric(dim: int) -> FrechetInceptionDistance:
    """The same metric fed with embeddings (B, dim) instead of images. It is computed where it is filled:
    callers hand it whole pools (already gathered across ranks), so ``compute`` must not all-gather again
    (that would count each row once per rank, and NCCL cannot gather these CPU states)."""
    return FrechetInceptionDistance(feature=EmbeddingFeature(dim), reset_real_features=False, sync_on_compute=False)


def frechet_distance(z_real: torch.Tensor, z_fake: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fit to two embedding sets (N, D) and (M, D), N, M >= 2:
    ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, by torchmetrics in float64. NaN when either
    set has a non-finite entry (a diverged model). With N <= D the covariances are rank-deficient: the
    distance is still defined but biased upwards, so compare only numbers from pools of one size."""
    if z_real.dim() != 2 or z_fake.dim() != 2 or z_real.shape[-1] != z_fake.shape[-1]:
        raise ValueError(f"frechet_distance needs two (N, D) embedding sets of one D, got {tuple(z_real.shape)} and {tuple(z_fake.shape)}")
    if not (torch.isfinite(z_real).all() and torch.isfinite(z_fake).all()):
        return float("nan")
    metric = embedding_fd_metric(z_real.shape[-1])
    metric.update(z_real.detach().cpu().double(), real=True)
    metric.update(z_fake.detach().cpu().double(), real=False)
    return float(metric.compute())


@torch.no_grad()
def fd_clip(clip, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """Fréchet distance between two image sets (N, 3, H, W) in [-1, 1], in the CLIP's normalised
    image-embedding space (logged as ``val/fd_clip``)."""
    encode = CLIPImageFeature(clip, batch_size)
    return frechet_distance(encode(real), encode(fake))


# ------------------------------------------------------------------------------ Inception FID/KID


def inception_weights(path: str | Path | None = None) -> Path | None:
    """torch-fidelity's Inception weights on disk: ``path`` if given, else torch.hub's cache; None when absent."""
    if path is not None:
        return Path(path) if Path(path).exists() else None
    candidate = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    return candidate if candidate.exists() else None


def inception_metrics(real: torch.Tensor, fake: torch.Tensor, weights: str | Path | None = None,
                      kid_subset_size: int = 50) -> dict[str, float] | None:
    """Inception FID and KID of two image sets (N, 3, H, W) in [-1, 1], or ``None`` (with a logged note)
    when torch-fidelity or its Inception weights are not available locally: it never downloads."""
    try:
        import torch_fidelity  # noqa: F401 - torchmetrics' Inception comes from it
    except ImportError:
        log.info("Inception FID/KID skipped: torch-fidelity is not installed (pip install torch-fidelity, "
                 "and put %s in %s/checkpoints)", INCEPTION_WEIGHTS, torch.hub.get_dir())
        return None
    found = inception_weights(weights)
    if found is None:
        log.info("Inception FID/KID skipped: no Inception weights at %s; nothing is downloaded",
                 weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS)
        return None
    from torchmetrics.image.kid import KernelInceptionDistance

    to_u8 = lambda x: (x.float() + 1).mul(127.5).round().clamp(0, 255).to(torch.uint8)  # noqa: E731 - Inception's input
    fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(found))
    # KID takes no weights path: it shares FID's Inception, as a custom feature fed the same uint8 images
    kid = KernelInceptionDistance(feature=fid.inception, subset_size=min(kid_subset_size, len(real), len(fake)))
    for metric in (fid, kid):
        metric.update(to_u8(real), real=True)
        metric.update(to_u8(fake), real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}
