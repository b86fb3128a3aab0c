"""What ``sample.py`` does with a composed config: build the pipeline, run one mode, write a grid + JSON."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from unclip.pipeline import UnCLIPOutput, UnCLIPPipeline

log = logging.getLogger(__name__)
MODES = ("generate", "vary", "interpolate", "text_diff")
IMAGES_NEEDED = {"vary": 1, "interpolate": 2, "text_diff": 1}


def build_pipeline(cfg: DictConfig) -> UnCLIPPipeline:
    if cfg.pipeline:
        return UnCLIPPipeline.from_pretrained(cfg.pipeline, device=cfg.device)
    prior = cfg.prior if cfg.mode == "generate" else None
    return UnCLIPPipeline.from_checkpoints(decoder=cfg.decoder, prior=prior, upsamplers=list(cfg.upsamplers),
                                          device=cfg.device, artifacts=cfg.paths.artifacts)


def check(cfg: DictConfig) -> None:
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {cfg.mode!r}")
    if cfg.mode == "generate" and not cfg.prompts:
        raise ValueError("mode=generate needs prompts='[\"a red circle\", ...]'")
    needed = IMAGES_NEEDED.get(cfg.mode, 0)
    if len(cfg.images) != needed and needed:
        raise ValueError(f"mode={cfg.mode} needs {needed} image(s) in images=[...], got {len(cfg.images)}")
    for path in cfg.images:
        if not Path(path).exists():
            raise FileNotFoundError(f"image {path} does not exist")
    if cfg.mode == "text_diff" and not (cfg.caption_from and cfg.caption_to):
        raise ValueError("mode=text_diff needs caption_from=... and caption_to=...")


def run_mode(pipe: UnCLIPPipeline, cfg: DictConfig) -> tuple[UnCLIPOutput, int, list[str]]:
    """The output, the grid's row length and a label per row."""
    stages = dict(decoder_guidance=cfg.decoder_guidance, decoder_steps=cfg.decoder_steps, upsampler_steps=cfg.upsampler_steps)
    if cfg.mode == "generate":
        out = pipe.generate(list(cfg.prompts), n=cfg.n, seed=cfg.seed, prior_guidance=cfg.prior_guidance,
                            prior_steps=cfg.prior_steps, negative_prompt=cfg.negative_prompt, **stages)
        return out, cfg.n, list(cfg.prompts)
    images = list(cfg.images)
    if cfg.mode == "vary":
        return pipe.vary(images[0], n=cfg.n, seed=cfg.seed, invert=cfg.invert, eta=cfg.eta, **stages), cfg.n, [images[0]]
    if cfg.mode == "interpolate":
        out = pipe.interpolate(images[0], images[1], k=cfg.k, seed=cfg.seed, invert=cfg.invert, **stages)
        return out, cfg.k, [f"{images[0]} -> {images[1]}"]
    out = pipe.text_diff(images[0], cfg.caption_from, cfg.caption_to, k=cfg.k, max_theta=cfg.max_theta, seed=cfg.seed, **stages)
    return out, cfg.k, [f"{images[0]}: {cfg.caption_from!r} -> {cfg.caption_to!r}"]


def save_grid(pixels: torch.Tensor, per_row: int, path: Path) -> Path:
    from torchvision.utils import make_grid, save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(pixels.add(1).div(2).clamp(0, 1).cpu(), nrow=per_row, padding=2), path)
    return path


def sample(cfg: DictConfig) -> Path:
    check(cfg)
    pipe = build_pipeline(cfg)
    for stage in (pipe.prior, pipe.decoder, *pipe.upsamplers):
        if getattr(stage, "sampler", None) is not None:
            stage.sampler.progress = bool(cfg.progress)  # a bar per diffusion loop
    with torch.no_grad():
        out, per_row, rows = run_mode(pipe, cfg)
    kind = pipe.prior.kind if (pipe.prior is not None and cfg.mode == "generate") else "decoder"
    stem = cfg.name or f"{cfg.mode}_{kind}_seed{cfg.seed}"
    grid = save_grid(out.pixels, per_row, Path(cfg.out) / f"{stem}.png")
    settings = {"rows": rows, "per_row": per_row, "prior": kind, "image_size": list(out.pixels.shape[-2:]),
                "stages": {name: getattr(stage, "checkpoint_path", None) for name, stage in
                           (("prior", pipe.prior), ("decoder", pipe.decoder),
                            *((f"upsampler_{i}", u) for i, u in enumerate(pipe.upsamplers)))},
                "clip": pipe.clip.identity(), "config": OmegaConf.to_container(cfg, resolve=True)}
    grid.with_suffix(".json").write_text(json.dumps(settings, indent=1, default=str))
    log.info("wrote %s (%d images, %d per row) and %s", grid, len(out.images), per_row, grid.with_suffix(".json"))
    print(f"wrote {grid}")
    return grid
