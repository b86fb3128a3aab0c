"""The attribute classifier's net: a small CNN that reads an image (any resolution, in [-1, 1]; resized
internally to ``image_size``) and predicts for every cell of the 3x3 grid ``unclip.data.shapes`` draws on:
empty or one of the shapes, the colour and the size of what is there. Shape and colour are separate heads
on purpose: the held-out [shape, colour] pairs of ``val_unseen`` never appear in train, and a joint
(shape, colour) class could never predict them. One head is shared by the nine cells (the cell's features
are pooled from its own square of the feature map), so each cell learns from every object in the data.

Cells are numbered row-major, ``cell = 3 * row + column``, which is the order of ``VOCAB.positions``
(top left, top, top right, left, center, right, bottom left, bottom, bottom right). Also here: the
per-cell targets and loss, and the classifier's checkpoint format.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip.data.shapes import POSITIONS, VOCAB

GRID = 3
CELLS = GRID * GRID
CELL_OF = {name: row * GRID + col for name, ((col, row), _) in POSITIONS.items()}  # position name -> cell index
assert [CELL_OF[p] for p in VOCAB.positions] == list(range(CELLS)), "VOCAB.positions must be row-major"
EMPTY = 0  # shape class 0 is "empty cell"; shape s is class 1 + VOCAB.shapes.index(s)
IGNORE = -100  # colour / size targets of empty cells (F.cross_entropy's ignore_index)

# ------------------------------------------------------------------------------------------- net


@dataclass
class ClassifierConfig:
    image_size: int = 48  # input side after the internal resize; divisible by 3 * 2 ** (len(channels) - 1)
    channels: tuple[int, ...] = (16, 32, 64)  # a stem conv, then per further entry a stride-2 conv and a conv
    width: int = 128  # per-cell feature width
    n_shapes: int = len(VOCAB.shapes)
    n_colors: int = len(VOCAB.colors)
    n_sizes: int = len(VOCAB.sizes)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        side = self.image_size // 2 ** (len(self.channels) - 1)
        if side * 2 ** (len(self.channels) - 1) != self.image_size or side % GRID:
            raise ValueError(f"classifier image_size {self.image_size} must be a multiple of 3 * 2**{len(self.channels) - 1} "
                             f"(three cells after {len(self.channels) - 1} halvings), e.g. {GRID * 2 ** (len(self.channels) - 1) * 4}")


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class AttributeNet(nn.Module):
    """images (B, 3, H, W) in [-1, 1] -> logits per cell: shape (B, 9, 1 + shapes), colour (B, 9, colours),
    size (B, 9, sizes)."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        layers = conv_bn(3, config.channels[0])  # one conv at full resolution: small shapes differ by a pixel or two
        for c_in, c in zip(config.channels, config.channels[1:]):
            layers += conv_bn(c_in, c, stride=2) + conv_bn(c, c)
        self.features = nn.Sequential(*layers)
        cell = config.image_size // 2 ** (len(config.channels) - 1) // GRID
        # A learned pooling over each cell's own square of the feature map: one kernel, shared by all cells.
        self.cell_pool = nn.Sequential(nn.Conv2d(config.channels[-1], config.width, cell, stride=cell),
                                       nn.BatchNorm2d(config.width), nn.ReLU(inplace=True))
        self.sizes = (1 + config.n_shapes, config.n_colors, config.n_sizes)
        self.head = nn.Conv2d(config.width, sum(self.sizes), 1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.config.image_size
        x = images.float()
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        cells = self.head(self.cell_pool(self.features(x)))  # (B, K, 3, 3)
        cells = cells.flatten(2).transpose(1, 2)  # (B, 9, K), row-major cells
        shape, color, size_logits = cells.split(self.sizes, dim=-1)
        return {"shape": shape, "color": color, "size": size_logits}


# ------------------------------------------------------------------------------- labels and loss


def encode_targets(objects_list: Sequence[Sequence[dict]]) -> dict[str, torch.Tensor]:
    """Per-cell class targets (B, 9) from each image's objects (KEY.json ``objects``): shape 0 = empty;
    colour and size are ``IGNORE`` in empty cells."""
    shape = torch.full((len(objects_list), CELLS), EMPTY, dtype=torch.long)
    color = torch.full_like(shape, IGNORE)
    size = torch.full_like(shape, IGNORE)
    for i, objects in enumerate(objects_list):
        for obj in objects:
            cell = CELL_OF[obj["position"]]
            shape[i, cell] = 1 + VOCAB.shapes.index(obj["shape"])
            color[i, cell] = VOCAB.colors.index(obj["color"])
            size[i, cell] = VOCAB.sizes.index(obj["size"])
    return {"shape": shape, "color": color, "size": size}


def loss_fn(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the three heads. Shape is counted over all cells (is anything there?) and again
    over occupied cells only, as colour and size are: averaged over all cells, an object's shape would
    weigh ~1/7 of its colour (most cells are empty), and circle / hexagon would be learnt last."""
    shape, target = logits["shape"].flatten(0, 1), targets["shape"].flatten()
    occupied = target != EMPTY
    loss = F.cross_entropy(shape, target) + (F.cross_entropy(shape[occupied], target[occupied]) if occupied.any() else 0.0)
    return loss + sum(F.cross_entropy(logits[k].flatten(0, 1), targets[k].flatten(), ignore_index=IGNORE) for k in ("color", "size"))


def hflip(images: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror left-right: columns of the grid swap. Every shape stays a shape of the same kind (the data
    tilts them by a symmetric random angle), so this doubles the layouts seen."""
    flipped = {k: v.view(-1, GRID, GRID).flip(-1).reshape(-1, CELLS) for k, v in targets.items()}
    return images.flip(-1), flipped


# ---------------------------------------------------------------------------------- checkpoints


def save_classifier(classifier: AttributeNet, path: str | Path, metrics: dict | None = None) -> Path:
    """A plain dict of tensors and containers (loads with ``weights_only=True``), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = asdict(classifier.config)
    config["channels"] = list(config["channels"])
    payload = {"kind": "attributes", "config": config, "state_dict": {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
               "vocab": {k: list(v) for k, v in asdict(VOCAB).items()}, "metrics": dict(metrics or {})}
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_classifier(path: str | Path = "outputs/artifacts/attributes/shapes.pt", device: str | torch.device = "cpu") -> AttributeNet:
    """The classifier saved by ``python train_classifier.py``, in eval mode; refuses another vocabulary."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no attribute classifier at {path}; train it with `python train_classifier.py`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    vocab = {k: list(v) for k, v in asdict(VOCAB).items()}
    if payload.get("vocab") != vocab:
        raise ValueError(f"attribute classifier {path} was trained on vocabulary {payload.get('vocab')}, "
                         f"but unclip.data.shapes.VOCAB is {vocab}; retrain it with `python train_classifier.py`")
    classifier = AttributeNet(ClassifierConfig(**payload["config"]))
    classifier.load_state_dict(payload["state_dict"])
    return classifier.to(device).eval()
