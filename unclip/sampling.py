"""What ``sample.py`` does with a composed config: build the pipeline, run one mode, write a grid + JSON."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from unclip.cli import UserError
from unclip.loading import resolve
from unclip.pipeline import MANIFEST, UnCLIPOutput, UnCLIPPipeline
from unclip.precision import PRECISIONS

log = logging.getLogger(__name__)
MODES = ("generate", "vary", "interpolate", "text_diff")
IMAGES_NEEDED = {"vary": 1, "interpolate": 2, "text_diff": 1}


def build_pipeline(cfg: DictConfig) -> UnCLIPPipeline:
    if cfg.pipeline:
        return UnCLIPPipeline.from_pretrained(cfg.pipeline, device=cfg.device, precision=cfg.get("precision", "32-true"))
    prior = cfg.prior if cfg.mode == "generate" else None
    return UnCLIPPipeline.from_checkpoints(decoder=cfg.decoder, prior=prior, upsamplers=list(cfg.upsamplers),
                                          device=cfg.device, artifacts=cfg.paths.artifacts,
                                          precision=cfg.get("precision", "32-true"))


def check(cfg: DictConfig) -> None:
    """Every argument and every stage path, before anything is loaded: a bad ``n`` or a missing prior is
    named as such, not as whatever the first load trips over. All problems go in one ``UserError``."""
    problems = argument_problems(cfg) + path_problems(cfg)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"{len(problems)} problems with the arguments:\n  " + "\n  ".join(problems))


def is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def argument_problems(cfg: DictConfig) -> list[str]:
    problems = []
    if cfg.mode not in MODES:
        problems.append(f"mode={cfg.mode}: must be one of {', '.join(MODES)}")
    if cfg.mode in ("generate", "vary") and not is_count(cfg.n, 1):
        problems.append(f"n={cfg.n}: samples per prompt must be an integer >= 1")
    if cfg.mode in ("interpolate", "text_diff") and not is_count(cfg.k, 2):
        problems.append(f"k={cfg.k}: mode={cfg.mode} needs an integer k >= 2 (images along the path, both ends included)")
    if cfg.mode == "generate":
        if not OmegaConf.is_list(cfg.prompts):
            problems.append(f"prompts={cfg.prompts}: must be a list: prompts='[\"a red circle\", ...]'")
        elif not cfg.prompts:
            problems.append("prompts=[]: mode=generate needs at least one prompt: prompts='[\"a red circle\", ...]'")
        bad = [p for p in (cfg.prompts if OmegaConf.is_list(cfg.prompts) else []) if not isinstance(p, str) or not p.strip()]
        if bad:
            problems.append(f"prompts: {', '.join(repr(p) for p in bad)} {'is' if len(bad) == 1 else 'are'} not "
                            f"a non-empty string; quote each prompt: prompts='[\"a red circle\", ...]'")
    for key in ("prior_guidance", "decoder_guidance"):
        value = cfg[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            problems.append(f"{key}={value}: a guidance scale must be a finite number (or null: the stage's default)")
    if cfg.get("precision", "32-true") not in PRECISIONS:
        problems.append(f"precision={cfg.precision}: must be one of {' | '.join(PRECISIONS)}")
    for key in ("prior_steps", "decoder_steps", "upsampler_steps"):
        if cfg[key] is not None and not is_count(cfg[key], 1):
            problems.append(f"{key}={cfg[key]}: sampling steps must be an integer >= 1 (or null: the stage's default)")
    needed = IMAGES_NEEDED.get(cfg.mode, 0)
    if len(cfg.images) != needed and needed:
        problems.append(f"images: mode={cfg.mode} needs {needed} image(s) in images=[...], got {len(cfg.images)}")
    problems += [f"images: {path} does not exist" for path in cfg.images if not Path(path).exists()]
    from unclip.completion import COMPLETERS
    from unclip.composition import SPLITTERS

    for key, known in (("compose", SPLITTERS), ("complete", COMPLETERS)):
        if cfg.get(key) and cfg[key] not in known:
            problems.append(f"{key}={cfg[key]}: must be one of {' | '.join(known)} (or null: off)")
    if cfg.mode == "text_diff" and not (cfg.caption_from and cfg.caption_to):
        problems.append("mode=text_diff needs caption_from=... and caption_to=...")
    return problems


def path_problems(cfg: DictConfig) -> list[str]:
    """Each stage resolved as ``build_pipeline`` will load it (``unclip.loading.resolve``), its failure
    named by its argument."""
    if cfg.pipeline:
        if not (Path(cfg.pipeline) / MANIFEST).exists():
            return [f"pipeline={cfg.pipeline}: holds no {MANIFEST}; write one with UnCLIPPipeline.save_pretrained"]
        return []
    stages = [("decoder", cfg.decoder)] + ([("prior", cfg.prior)] if cfg.mode == "generate" else [])
    stages += [(f"upsamplers[{i}]", spec) for i, spec in enumerate(cfg.upsamplers)]
    problems = []
    for name, spec in stages:
        try:
            resolve(spec, cfg.paths.artifacts)
        except FileNotFoundError as exn:
            problems.append(f"{name}={spec}: {exn}")
    return problems


def run_mode(pipe: UnCLIPPipeline, cfg: DictConfig) -> tuple[UnCLIPOutput, int, list[str]]:
    """The output, the grid's row length and a label per row."""
    stages = dict(decoder_guidance=cfg.decoder_guidance, decoder_steps=cfg.decoder_steps, upsampler_steps=cfg.upsampler_steps)
    if cfg.mode == "generate":
        from unclip.completion import completer_named
        from unclip.composition import splitter_named

        compose = splitter_named(cfg.compose) if cfg.get("compose") else None
        complete = completer_named(cfg.complete) if cfg.get("complete") else None
        out = pipe.generate(list(cfg.prompts), n=cfg.n, seed=cfg.seed, prior_guidance=cfg.prior_guidance,
                            prior_steps=cfg.prior_steps, negative_prompt=cfg.negative_prompt, compose=compose,
                            layout=bool(cfg.get("layout", False)), rerank=int(cfg.get("rerank", 1)), complete=complete,
                            **stages)
        return out, cfg.n, list(cfg.prompts)
    images = list(cfg.images)
    if cfg.mode == "vary":
        return pipe.vary(images[0], n=cfg.n, seed=cfg.seed, invert=cfg.invert, eta=cfg.eta, **stages), cfg.n, [images[0]]
    if cfg.mode == "interpolate":
        out = pipe.interpolate(images[0], images[1], k=cfg.k, seed=cfg.seed, invert=cfg.invert, **stages)
        return out, cfg.k, [f"{images[0]} -> {images[1]}"]
    out = pipe.text_diff(images[0], cfg.caption_from, cfg.caption_to, k=cfg.k, max_theta=cfg.max_theta, seed=cfg.seed, **stages)
    return out, cfg.k, [f"{images[0]}: {cfg.caption_from!r} -> {cfg.caption_to!r}"]


def save_grid(pixels: torch.Tensor, per_row: int, path: Path, row_labels: list[str] | None = None) -> Path:
    """Images (N, 3, H, W) in [-1, 1] as a PNG grid of ``per_row`` columns; ``row_labels``: a text strip on
    the left naming each row (the demo marks its held-out and two-object rows so)."""
    from torchvision.utils import make_grid, save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    grid = make_grid(pixels.add(1).div(2).clamp(0, 1).cpu(), nrow=per_row, padding=2)
    if not row_labels:
        save_image(grid, path)
        return path
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import to_pil_image

    image, font = to_pil_image(grid), ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    width = 8 + max(int(draw.textlength(label, font=font)) for label in row_labels)
    labelled = Image.new("RGB", (image.width + width, image.height), "white")
    labelled.paste(image, (width, 0))
    draw, row_height = ImageDraw.Draw(labelled), pixels.shape[-2] + 2
    for row, label in enumerate(row_labels):
        draw.text((4, 2 + row * row_height + row_height // 2 - 6), label, fill="black", font=font)
    labelled.save(path)
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
