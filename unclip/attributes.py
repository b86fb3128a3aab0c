"""The shapes attribute classifier: what is drawn in each of the 3x3 position cells, and how it is scored.

A small CNN reads an image (any resolution, in [-1, 1]; resized internally to ``image_size``) and
predicts for every cell of the 3x3 grid ``unclip.data.shapes`` draws on: empty or one of the shapes,
the colour and the size of what is there. Shape and colour are separate heads on purpose: the held-out
[shape, colour] pairs of ``val_unseen`` never appear in train, and a joint (shape, colour) class could
never predict them. One head is shared by the nine cells (the cell's features are pooled from its own
square of the feature map), so each cell learns from every object in the data.

    python -m unclip.attributes                                  # data=shapes, writes outputs/artifacts/attributes/shapes.pt
    python -m unclip.attributes data.train='/d/train-*.tar' data.val='/d/val-*.tar' data.val_unseen='/d/val_unseen-*.tar' out=/x.pt

Cells are numbered row-major, ``cell = 3 * row + column``, which is the order of
``VOCAB.positions`` (top left, top, top right, left, center, right, bottom left, bottom, bottom right).

Scoring (:func:`score_predictions`, :func:`attribute_accuracy`) is object by object: a two-object
prompt gives two scored objects. See :func:`score_predictions` for the exact rule.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import hydra
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unclip.data.shapes import COLORS, PAIR_TEMPLATES, POSITIONS, SHAPES, SIZES, TEMPLATES, VOCAB

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------- predictions


@dataclass
class CellPredictions:
    """Per-cell classes, row-major cells: ``shape`` (B, 9) with 0 = empty else 1 + index in
    ``VOCAB.shapes``; ``color`` (B, 9) index in ``VOCAB.colors``; ``size`` (B, 9) index in ``VOCAB.sizes``
    (colour and size mean nothing in an empty cell)."""

    shape: torch.Tensor
    color: torch.Tensor
    size: torch.Tensor

    def __len__(self) -> int:
        return len(self.shape)

    def objects(self, i: int) -> list[dict]:
        """Image ``i`` as KEY.json-style objects, one per non-empty cell."""
        return [{"shape": VOCAB.shapes[int(self.shape[i, c]) - 1], "color": VOCAB.colors[int(self.color[i, c])],
                 "size": VOCAB.sizes[int(self.size[i, c])], "position": VOCAB.positions[c]}
                for c in range(CELLS) if int(self.shape[i, c]) != EMPTY]

    @classmethod
    def from_objects(cls, objects_list: Sequence[Sequence[dict]]) -> "CellPredictions":
        """The predictions a perfect classifier would make for these (fully specified) objects."""
        targets = encode_targets(objects_list)
        return cls(targets["shape"], targets["color"].clamp(min=0), targets["size"].clamp(min=0))


@torch.no_grad()
def predict(classifier: AttributeNet, images: torch.Tensor, batch_size: int = 256) -> CellPredictions:
    """images (B, 3, H, W) in [-1, 1], any H = W -> the argmax class of every head in every cell."""
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    out = {"shape": [], "color": [], "size": []}
    try:
        for start in range(0, len(images), batch_size):
            logits = classifier(images[start:start + batch_size].to(device))
            for k in out:
                out[k].append(logits[k].argmax(-1).cpu())
    finally:
        classifier.train(was_training)
    if not len(images):
        return CellPredictions(*(torch.zeros(0, CELLS, dtype=torch.long) for _ in range(3)))
    return CellPredictions(**{k: torch.cat(v) for k, v in out.items()})


# -------------------------------------------------------------------------------------- scoring


ACCURACY_KEYS = ("attr_acc", "attr_shape", "attr_color", "attr_size", "attr_position", "attr_prompt")


def named_objects(meta: dict) -> list[dict]:
    """The objects of a KEY.json as its caption names them: single-object templates may leave out the
    size (``"a red circle in the top left"``) or the position (``"a small red circle"``); those keys are
    dropped here, so scoring a generated image against its prompt asks only for what the prompt said.
    (The full ``meta["objects"]`` describes the image itself: use it to score reconstructions.)"""
    objects = meta.get("objects", [])
    if len(objects) != 1:  # pair templates name shape, colour, size and position of both objects
        template = "{size} {color} {shape} in the {position}"
    else:
        template = TEMPLATES[int(meta.get("template", 0))]
    return [{k: obj[k] for k in ("shape", "color", "size", "position") if "{" + k + "}" in template} for obj in objects]


def _phrase_pattern(table: dict) -> tuple[re.Pattern, dict[str, str]]:
    words = {w: name for name, value in table.items() for w in (value[-1] if isinstance(value, tuple) else value)}
    alternatives = sorted(words, key=len, reverse=True)  # longest first: "top left" before "top"
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alternatives) + r")\b"), words


_PATTERNS = {key: _phrase_pattern(table) for key, table in
             (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS))}
_PAIR_SPLIT = re.compile("|".join(re.escape(t.replace("{obj1}", "").replace("{obj2}", "")) for t in PAIR_TEMPLATES))


def objects_from_caption(caption: str) -> list[dict]:
    """Parses a shapes-style caption or prompt (any template, any synonym) into prompt labels: one dict
    per object with the attributes the text names (``"a large blue square"`` -> ``[{shape, color, size}]``).
    An object phrase without a shape or a colour cannot be scored and raises ValueError."""
    objects = []
    for phrase in _PAIR_SPLIT.split(caption.lower()):
        obj = {}
        for key, (pattern, words) in _PATTERNS.items():
            found = pattern.findall(phrase)
            if found:
                obj[key] = words[found[0]]
        if "shape" not in obj or "color" not in obj:
            raise ValueError(f"cannot score {phrase.strip()!r} of prompt {caption!r}: it names no shape and colour of "
                             f"unclip.data.shapes.VOCAB")
        objects.append(obj)
    return objects


def _cell_has(pred: CellPredictions, i: int, cell: int, obj: dict) -> tuple[bool, bool, bool]:
    """(shape, colour, size) of the object match cell ``cell`` of image ``i``; an empty cell matches nothing."""
    shape = int(pred.shape[i, cell])
    if shape == EMPTY:
        return False, False, False
    return (VOCAB.shapes[shape - 1] == obj["shape"], VOCAB.colors[int(pred.color[i, cell])] == obj["color"],
            VOCAB.sizes[int(pred.size[i, cell])] == obj.get("size"))


def _resolve_cell(pred: CellPredictions, i: int, obj: dict, taken: set[int]) -> int | None:
    """The cell an object is scored in: its named position; without one, the first free cell holding
    its shape and colour, else the first free non-empty cell holding either, else none."""
    if obj.get("position") is not None:
        return CELL_OF[obj["position"]]
    free = [c for c in range(CELLS) if c not in taken]
    for wanted in (2, 1):
        for cell in free:
            shape_ok, color_ok, _ = _cell_has(pred, i, cell, obj)
            if shape_ok + color_ok >= wanted:
                return cell
    return None


def score_predictions(pred: CellPredictions, objects_list: Sequence[Sequence[dict]]) -> dict[str, float]:
    """Attribute accuracies of per-cell predictions against the objects each image should show.

    ``objects_list[i]``: image i's objects as dicts with ``shape`` and ``color`` and optionally ``size``
    and ``position`` (KEY.json ``objects``, :func:`named_objects`, :func:`objects_from_caption`); a
    missing or None size / position means the prompt did not ask for one.

    The rule, object by object (a two-object prompt gives two scored objects):

    * the object's cell is its named position; without a position it is the first cell holding its
      shape and colour (else one holding either, else none), never a cell already used by another
      object of the same image, so "a red circle" is right wherever the red circle is drawn;
    * ``attr_acc``: that cell holds the object's shape **and** colour (size is not required);
    * ``attr_shape`` / ``attr_color``: that cell holds its shape / its colour;
    * ``attr_size``: that cell holds an object of its size (objects whose size is named only);
    * ``attr_position``: the named cell holds some object (objects whose position is named only);
    * ``attr_prompt``: every object of the image is right (``attr_acc`` per image).

    Positioned objects claim their cells first. Objects drawn but not asked for are not penalised.
    Accuracies are means over scored objects (``nan`` when
    there are none); ``n_objects`` counts them.
    """
    if len(pred) != len(objects_list):
        raise ValueError(f"{len(pred)} predictions for {len(objects_list)} object lists")
    hits = {k: [] for k in ACCURACY_KEYS}
    for i, objects in enumerate(objects_list):
        order = sorted(range(len(objects)), key=lambda j: objects[j].get("position") is None)  # positioned first
        taken = {CELL_OF[o["position"]] for o in objects if o.get("position") is not None}
        all_right = True
        for j in order:
            obj = objects[j]
            cell = _resolve_cell(pred, i, obj, taken)
            shape_ok, color_ok, size_ok = _cell_has(pred, i, cell, obj) if cell is not None else (False, False, False)
            if obj.get("position") is None and cell is not None:
                taken.add(cell)
            hits["attr_acc"].append(shape_ok and color_ok)
            hits["attr_shape"].append(shape_ok)
            hits["attr_color"].append(color_ok)
            if obj.get("size") is not None:
                hits["attr_size"].append(size_ok)
            if obj.get("position") is not None:
                hits["attr_position"].append(int(pred.shape[i, cell]) != EMPTY)
            all_right &= shape_ok and color_ok
        if objects:
            hits["attr_prompt"].append(all_right)
    out = {k: (sum(v) / len(v) if v else math.nan) for k, v in hits.items()}
    out["n_objects"] = len(hits["attr_acc"])
    return out


def attribute_accuracy(classifier: AttributeNet, images: torch.Tensor, objects_list: Sequence[Sequence[dict]],
                       batch_size: int = 256) -> dict[str, float]:
    """Classifies ``images`` (B, 3, H, W) in [-1, 1] and scores them against ``objects_list`` with
    :func:`score_predictions`; ``attr_acc`` is what validation logs as ``val/attr_acc``."""
    return score_predictions(predict(classifier, images, batch_size), objects_list)


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
    """The classifier saved by ``python -m unclip.attributes``, in eval mode; refuses another vocabulary."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no attribute classifier at {path}; train it with `python -m unclip.attributes`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    vocab = {k: list(v) for k, v in asdict(VOCAB).items()}
    if payload.get("vocab") != vocab:
        raise ValueError(f"attribute classifier {path} was trained on vocabulary {payload.get('vocab')}, "
                         f"but unclip.data.shapes.VOCAB is {vocab}; retrain it with `python -m unclip.attributes`")
    classifier = AttributeNet(ClassifierConfig(**payload["config"]))
    classifier.load_state_dict(payload["state_dict"])
    return classifier.to(device).eval()


# ------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    epochs: int = 6
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    flip: bool = True  # left-right mirror with the grid columns swapped
    lowres_sizes: list = field(default_factory=lambda: [32])  # also train on images downsampled to these sides...
    lowres_p: float = 0.3  # ...this often, so that 32 px decoder samples read like 64 px ones
    noise_std: float = 0.03  # gaussian pixel noise, a little robustness to sampling artefacts
    recolor_p: float = 0.5  # share of images given a random hue, colour targets ignored: shape must then be
    #                          read without colour, so that held-out [shape, colour] pairs are recognised
    seed: int = 0
    log_every: int = 50


def to_unit(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.float().div_(127.5).sub_(1.0)


def hue_rotation(angles: torch.Tensor) -> torch.Tensor:
    """(R,) angles in radians -> (R, 3, 3) rotations of RGB space about the grey axis (Rodrigues' formula):
    a hue shift that keeps grey, and so the muted backgrounds, nearly as they are."""
    k = torch.full((3,), 3 ** -0.5)
    cross = torch.tensor([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    cos, sin = angles.cos()[:, None, None], angles.sin()[:, None, None]
    return cos * torch.eye(3) + sin * cross + (1 - cos) * torch.outer(k, k)


def augment(images: torch.Tensor, targets: dict[str, torch.Tensor], cfg: TrainConfig, generator: torch.Generator):
    if cfg.recolor_p:
        rows = (torch.rand(len(images), generator=generator) < cfg.recolor_p).nonzero().flatten()
        if len(rows):
            rotation = hue_rotation(torch.rand(len(rows), generator=generator) * 2 * math.pi)  # (R, 3, 3)
            images = images.clone()
            images[rows] = torch.einsum("rij,rjhw->rihw", rotation, images[rows]).clamp(-1, 1)
            targets = {**targets, "color": targets["color"].clone()}
            targets["color"][rows] = IGNORE
    if cfg.flip and torch.rand((), generator=generator) < 0.5:
        images, targets = hflip(images, targets)
    if cfg.lowres_sizes and torch.rand((), generator=generator) < cfg.lowres_p:
        side = int(cfg.lowres_sizes[int(torch.randint(len(cfg.lowres_sizes), (), generator=generator))])
        if side < images.shape[-1]:
            images = F.interpolate(images, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
    if cfg.noise_std:
        images = images + cfg.noise_std * torch.rand((), generator=generator) * torch.randn(images.shape, generator=generator)
    return images, targets


def train_classifier(images_u8: torch.Tensor, objects_list: Sequence[Sequence[dict]], config: ClassifierConfig,
                     train: TrainConfig, steps: int | None = None) -> AttributeNet:
    """Fits an :class:`AttributeNet` on images held in memory: ``images_u8`` (N, 3, H, W) uint8 and each
    image's objects (KEY.json ``objects``). AdamW, linear warmup then cosine decay; ``steps`` overrides
    ``train.epochs``."""
    torch.manual_seed(train.seed)
    generator = torch.Generator().manual_seed(train.seed)
    net = AttributeNet(config).to(memory_format=torch.channels_last)  # ~20 % faster convolutions on CPU
    targets = encode_targets(objects_list)
    per_epoch = max(1, len(images_u8) // train.batch_size)
    total = steps if steps is not None else train.epochs * per_epoch
    optimizer = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    warmup = min(train.warmup_steps, max(1, total // 10))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, total)))))
    net.train()
    step, start = 0, time.perf_counter()
    while step < total:
        order = torch.randperm(len(images_u8), generator=generator)
        for first in range(0, per_epoch * train.batch_size, train.batch_size):
            rows = order[first:first + train.batch_size]
            x, y = augment(to_unit(images_u8[rows]), {k: v[rows] for k, v in targets.items()}, train, generator)
            loss = loss_fn(net(x.contiguous(memory_format=torch.channels_last)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if train.log_every and step % train.log_every == 0:
                log.info("step %d/%d loss %.4f (%.1fs)", step, total, loss.item(), time.perf_counter() - start)
            if step >= total:
                break
    return net.to(memory_format=torch.contiguous_format).eval()


def load_split(datamodule, split: str, limit: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """A whole split in memory: images as uint8 (N, 3, H, W) at the shards' resolution, and their KEY.json."""
    datamodule.setup()
    dataset = datamodule.datasets[split]
    dataset.drop_last, dataset.shuffle = False, False
    images, metas = [], []
    for batch in datamodule.loader(split):
        images.append(batch["image"].add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8))
        metas += batch["meta"]
        if limit and len(metas) >= limit:
            break
    images_u8 = torch.cat(images)[:limit] if limit else torch.cat(images)
    return images_u8, metas[: len(images_u8)]


def evaluate_split(classifier: AttributeNet, images_u8: torch.Tensor, metas: list[dict], sizes: Sequence[int | None] = (None, 32)) -> dict:
    """Accuracies on real images at their own resolution (``None``) and downsampled to each of ``sizes``:
    against every drawn object (``scene``) and against what the caption names (``caption``)."""
    out = {}
    for side in sizes:
        images = to_unit(images_u8)
        if side is not None and side != images.shape[-1]:
            images = F.interpolate(images, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        pred = predict(classifier, images)
        tag = f"{images.shape[-1]}px"
        out[f"scene_{tag}"] = score_predictions(pred, [m["objects"] for m in metas])
        out[f"caption_{tag}"] = score_predictions(pred, [named_objects(m) for m in metas])
    return out


def run(cfg: DictConfig) -> dict:
    """Trains on ``cfg.data``'s train split, evaluates on val / val_unseen, saves to ``cfg.out``."""
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    classifier_cfg = ClassifierConfig(**OmegaConf.to_container(cfg.classifier, resolve=True))
    train_cfg = TrainConfig(**OmegaConf.to_container(cfg.train, resolve=True))
    datamodule = instantiate(cfg.data, _convert_="all", shuffle=False, batch_size=cfg.data.val_batch_size)
    start = time.perf_counter()
    images, metas = load_split(datamodule, "train", cfg.limit)
    log.info("loaded %d train images %s in %.1fs", len(images), tuple(images.shape[1:]), time.perf_counter() - start)
    start = time.perf_counter()
    classifier = train_classifier(images, [m["objects"] for m in metas], classifier_cfg, train_cfg)
    train_seconds = time.perf_counter() - start
    metrics = {"train_seconds": round(train_seconds, 1), "train_images": len(images)}
    for split in ("val", "val_unseen"):
        if split in datamodule.datasets:
            val_images, val_metas = load_split(datamodule, split)
            for name, scores in evaluate_split(classifier, val_images, val_metas).items():
                metrics[f"{split}/{name}"] = {k: round(v, 4) for k, v in scores.items()}
    path = save_classifier(classifier, cfg.out, metrics)
    for key, value in metrics.items():
        print(f"{key}: {value}")
    print(f"attribute classifier: {path} (trained {train_seconds:.0f}s on {len(images)} images)")
    return metrics


@hydra.main(config_path="../conf", config_name="attributes", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
