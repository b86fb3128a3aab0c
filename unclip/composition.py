"""Prompts that name several things, sampled as a conjunction of their parts (Composable Diffusion, Liu et al.
2022 §3.2): each part gets its own prior draw z_k, and the decoder is guided towards every (z_k, part) at once,
out = out_uncond + s Σ_k (out_k - out_uncond) (:func:`unclip.diffusion.composed_guidance`). One CLIP embedding
of "a red circle in the left and a blue square in the right" holds both colours and both shapes but not which
goes with which; two single-object embeddings, each naming its own cell, do.

    pipe.generate(["a red circle in the left AND a blue square in the right"], compose=split_and)
    pipe.generate(captions, compose=object_phrases)    # the shapes data's two-object captions as they are written

A prompt with one part is sampled as usual; prompts with fewer parts than others in the batch give the missing
parts weight 0.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from unclip.data.shapes import POSITIONS
from unclip.eval.attributes.captions import named_value

Splitter = Callable[[str], Sequence[str]]


def split_and(prompt: str, separator: str = " AND ") -> list[str]:
    """The parts of a prompt joined by an upper-case ``AND`` (the convention of Composable Diffusion's code)."""
    return [part.strip() for part in prompt.split(separator) if part.strip()]


def object_phrases(caption: str) -> list[str]:
    """The object phrases of a shapes caption (``unclip.data.shapes.PAIR_TEMPLATES``: "X and Y", "X, next to Y"),
    each made a caption of its own; a one-object caption is one part."""
    parts = [p.strip() for p in re.split(r",? next to | and ", caption) if p.strip()]
    return parts if len(parts) > 1 else [caption]


def conjunction(prompts: Sequence[str], split: Splitter) -> tuple[list[list[str]], torch.Tensor]:
    """K lists of B part prompts (the parts of prompt b at [k][b]; a prompt's last part fills its missing ones)
    and their weights (K, B): 1 for a real part, 0 for a filler."""
    parts = [list(split(p)) or [p] for p in prompts]
    k = max(len(p) for p in parts)
    rows = [[p[min(i, len(p) - 1)] for p in parts] for i in range(k)]
    weights = torch.tensor([[1.0 if i < len(p) else 0.0 for p in parts] for i in range(k)])
    return rows, weights


def named_cell(phrase: str) -> tuple[int, int] | None:
    """The (column, row) of the 3x3 cell a phrase puts its object in ("... in the top left": (0, 0)), read by the
    evaluator's caption parser (the shapes data's positions and synonyms, "top left" before "left"), or None."""
    position = named_value("position", phrase)
    return None if position is None else POSITIONS[position][0]


def layout_weights(parts: list[list[str]], weights: torch.Tensor, size: int = 24, sigma: float = 0.17,
                   floor: float = 0.05) -> torch.Tensor:
    """Spatial part weights (K, B, 1, size, size) for :func:`unclip.diffusion.composed_guidance` from the cells the
    parts name: part k leads near its cell (a Gaussian bump of ``sigma`` image sides) and the parts share the rest
    (``floor``), the weights of prompt b's parts summing to 1 at every pixel, so each region is classifier-free
    guidance towards its own part alone (region-based composition, as in MultiDiffusion, Bar-Tal et al. 2023, §3.2)
    instead of every part's direction everywhere, where one part's "background" cancels the other's object. A part
    that names no cell is spread evenly; a prompt none of whose parts names a cell keeps its weights (K, B)."""
    k, b = weights.shape
    grid = (torch.arange(size) + 0.5) / size
    maps = torch.ones(k, b, size, size)
    for i in range(k):
        for j in range(b):
            cell = named_cell(parts[i][j])
            if cell is not None:
                dx, dy = grid[None, :] - (cell[0] + 0.5) / 3, grid[:, None] - (cell[1] + 0.5) / 3
                maps[i, j] = torch.exp(-(dx ** 2 + dy ** 2) / (2 * sigma ** 2))
    maps = (maps + floor) * weights[..., None, None]
    spatial = maps / maps.sum(0, keepdim=True)
    placed = torch.tensor([[named_cell(parts[i][j]) is not None for j in range(b)] for i in range(k)])
    placed = (placed & (weights > 0)).any(0)
    uniform = weights[..., None, None].expand(k, b, size, size)
    return torch.where(placed[None, :, None, None], spatial, uniform).unsqueeze(2)


def generate_composed(pipe, prompts: list[str], split: Splitter, generator: torch.Generator, prior_options: dict,
                      decode_options: dict, layout: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels (B, 3, H, W), z_img (B, D)) for prompts sampled as conjunctions: one prior draw per part (every
    part of the batch in one call), then one composed decode, each part leading where it names (``layout``:
    :func:`layout_weights`) or everywhere. z_img is the normalised weighted sum of the parts'."""
    parts, weights = conjunction(prompts, split)
    k, b = weights.shape
    z = pipe.prior_sample([p for row in parts for p in row], generator, **prior_options).view(k, b, -1)
    captions = parts if pipe.decoder.text_cond else None
    guide = layout_weights(parts, weights) if layout else weights
    pixels = pipe.decode(z, generator, captions=captions, weights=guide.to(pipe.device), **decode_options)
    return pixels, F.normalize((weights.to(z.device)[..., None] * z).sum(0), dim=-1)


def whole_and_object_phrases(caption: str) -> list[str]:
    """The whole caption and its object phrases (:func:`object_phrases`): the whole keeps the scene's object count,
    the phrases say which attributes go where."""
    parts = object_phrases(caption)
    return [caption, *parts] if len(parts) > 1 else parts


SPLITTERS = {"split_and": split_and, "object_phrases": object_phrases, "whole_and_object_phrases": whole_and_object_phrases}


def splitter_named(name: str) -> Splitter:
    """A splitter by its config name (``compose=`` of sample.py and the demo grids)."""
    if name not in SPLITTERS:
        raise ValueError(f"compose={name!r} is not a prompt splitter; known: {sorted(SPLITTERS)}")
    return SPLITTERS[name]
