"""Training the attribute classifier on the shapes shards (``python train_classifier.py``): augmentation
that keeps shape readable without colour, and the val / val_unseen report saved beside the weights.

    python train_classifier.py                          # data=shapes, writes outputs/artifacts/attributes/shapes.pt
    python train_classifier.py data.train='/d/train-*.tar' data.val='/d/val-*.tar' data.val_unseen='/d/val_unseen-*.tar' out=/x.pt
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from unclip.eval.attributes.captions import named_objects
from unclip.eval.attributes.net import IGNORE, AttributeNet, ClassifierConfig, encode_targets, hflip, loss_fn, save_classifier
from unclip.eval.attributes.scoring import predict, score_predictions

log = logging.getLogger(__name__)


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
    optimizer = torch.optim.AdamW(net.parameters(), lr=train.lr, weight_decay=train.weight_decay, fused=True)
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
