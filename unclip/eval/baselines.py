"""The baselines as priors, so they get image metrics like any trained prior, and the one loader that
gives evaluation a prior by name, path or published stage."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from unclip import registry
from unclip.data import cache as cache_lib
from unclip.eval.prior_metrics import BASELINES, baseline_predictions
from unclip.loading import load


class BaselinePrior:
    """A parameter-free stand-in for a prior, so the baselines get image metrics too: ẑ_i = z_t
    (``baseline_zt``) or the ridge map z_t W + b fit on train pairs (``baseline_linear``), normalised.
    Guidance and steps mean nothing to it; its sampling cost is nil."""

    def __init__(self, kind: str, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        if kind not in BASELINES:
            raise ValueError(f"unknown baseline {kind!r}; known: {', '.join(BASELINES)}")
        if kind == "baseline_linear" and (weight is None or bias is None):
            raise ValueError("baseline_linear needs the linear map's weight and bias (the cache's stats.npz)")
        self.kind, self.weight, self.bias = kind, weight, bias
        self.hparams = {"kind": kind, "clip": {}}  # no CLIP of its own: the pipeline's identity check passes
        self.device = torch.device("cpu")
        self.checkpoint_path = None

    @classmethod
    def from_cache(cls, kind: str, cache_dir: str | Path) -> "BaselinePrior":
        stats = cache_lib.load_stats(cache_dir)
        return cls(kind, torch.as_tensor(stats["linear_weight"]).float(), torch.as_tensor(stats["linear_bias"]).float())

    def to(self, device) -> "BaselinePrior":
        self.device = torch.device(device)
        self.weight = None if self.weight is None else self.weight.to(self.device)
        self.bias = None if self.bias is None else self.bias.to(self.device)
        return self

    def eval(self) -> "BaselinePrior":
        return self

    def condition(self, batch: dict) -> dict:
        return {"z_txt_raw": batch["txt_emb"].float().to(self.device)}

    def sample(self, cond: dict, generator: torch.Generator | None = None, **_settings) -> torch.Tensor:
        z_txt = cond["z_txt_raw"]
        weight = self.weight if self.weight is not None else torch.eye(z_txt.shape[-1], device=z_txt.device)
        bias = self.bias if self.bias is not None else torch.zeros(z_txt.shape[-1], device=z_txt.device)
        return F.normalize(baseline_predictions(z_txt, weight, bias)[self.kind].float(), dim=-1)


def load_prior(spec: str | Path, clip, artifacts: str | Path, cache_dir: str | Path):
    """A baseline by name, or a trained prior by checkpoint path or published name (EMA weights)."""
    if str(spec) in BASELINES:
        return BaselinePrior.from_cache(str(spec), cache_dir)
    module = load(spec, clip=clip, artifacts=artifacts)
    if not registry.is_prior(module.kind):
        raise ValueError(f"{spec!r} is a {module.kind} stage, not a prior ({registry.prior_names().replace('|', ', ')}, "
                         f"a prior checkpoint, or one of {', '.join(BASELINES)})")
    return module


def has_steps(prior) -> bool:
    """Whether the prior samples by a diffusion chain (so ``steps`` means something to it)."""
    return getattr(prior, "diffusion", None) is not None
