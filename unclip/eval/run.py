"""One evaluation CLI for every prior and decoder (``python evaluate.py mode=...``): the mode picks the job.

    python evaluate.py mode=prior prior=diffusion                       # one prior over its eval.settings
    python evaluate.py mode=compare priors=[diffusion,ar]               # side by side, with the baselines
    python evaluate.py mode=images prior=diffusion decoder=decoder n=2  # prompt suite -> images -> metrics
    python evaluate.py leaderboard priors=[diffusion,ar,contrastive]    # a bare first word is the mode
    python evaluate.py mode=steps prior=diffusion decoder=decoder       # quality against sampling steps
    python evaluate.py mode=breakdown priors=[diffusion,ar]             # where a wrong picture comes from, stage by stage
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

MODES = ("prior", "compare", "images", "leaderboard", "steps", "breakdown")


@torch.no_grad()
def run(cfg: DictConfig):
    if cfg.mode not in MODES:
        raise ValueError(f"unknown evaluate mode {cfg.mode!r}; choose among {', '.join(MODES)}")
    clip = instantiate(cfg.clip, _convert_="all")  # the run's CLIP; load() refuses a prior trained with another
    if cfg.mode in ("prior", "compare"):
        from unclip.eval.compare import run_compare

        return run_compare(cfg, clip)
    if cfg.mode == "images":
        from unclip.eval.images import run_images

        return run_images(cfg, clip)
    if cfg.mode == "steps":
        from unclip.eval.steps import run_steps

        return run_steps(cfg, clip)
    if cfg.mode == "breakdown":
        from unclip.eval.breakdown import run_breakdown

        return run_breakdown(cfg, clip)
    from unclip.eval.leaderboard import run_leaderboard

    return run_leaderboard(cfg, clip)


def mode_word_as_override(argv: list[str]) -> list[str]:
    """``python evaluate.py leaderboard ...`` -> ``... mode=leaderboard ...``: a bare first argument
    (no ``=``, not a flag) names the mode; Hydra itself would reject it."""
    if len(argv) < 2 or "=" in argv[1] or argv[1].startswith(("-", "+", "~")):
        return list(argv)
    if argv[1] not in MODES:
        raise SystemExit(f"unknown evaluate mode {argv[1]!r}; choose among {', '.join(MODES)} (or pass mode=...)")
    return [argv[0], f"mode={argv[1]}", *argv[2:]]
