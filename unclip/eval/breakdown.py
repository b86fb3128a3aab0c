"""Where a wrong picture comes from (``python evaluate.py mode=breakdown``): one row per link of the chain,
on seen (``val``) and held-out (``val_unseen``) compositions, single- and two-object images apart.

    real            the attribute classifier on the real images: the evaluator's own ceiling
    clip_zero_shot  CLIP picks the true caption among captions that differ in one attribute
    decoder_true_zi the decoder from each real image's own z_i (the cache's): what decoding loses
    upsampled_real  the real images through the upsamplers: what upsampling alone loses (with ``upsamplers=[...]``)
    upsampled       the decoded pixels through the upsamplers (only with ``upsamplers=[...]``)
    <prior>         the prior from the real caption, then the decoder (and upsamplers): end to end
    <prior> composed (NAME) the same with ``compose=NAME`` (and ``layout=true``): the caption drawn as a conjunction
                    of its parts (``unclip.composition``), a prior draw for each and one decode guided towards all

Every row scores the same val pairs (the first ``breakdown_pool`` of each split) with the same seeds.
Columns: ``shape``, ``color``, ``position`` per object the caption names, ``count`` (the image holds as many
objects as the caption names: "no extra object"), ``acc`` (shape and colour right, per object) and
``prompt`` (every object of the image right), with 95 % Wilson intervals (``acc_ci``, ``prompt_ci``: half
widths) so a difference between two rows can be read against its noise. One-object rows also carry
``by_shape``, shape right per object shape (a second table in ``breakdown.md``): which shapes a link loses.
CLIP's zero-shot ``count`` asks whether the caption of the first object alone or with a second object fits
better. Rows of pixels also carry ``outline``: ``prompt`` and ``count`` together as read by the outline reader
(``unclip.eval.outlines``), which has no weights, so a classifier's blind spot shows as a gap between the two.
Writes ``breakdown.{json,md}``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from unclip.composition import splitter_named
from unclip.data.shapes import VOCAB, with_articles
from unclip.eval.attributes import CellPredictions, load_classifier, named_objects, predict, score_predictions
from unclip.eval.attributes.net import EMPTY
from unclip.eval.baselines import load_prior
from unclip.eval.generation import batches, compose_images, decode_embeddings, sample_embeddings, seeded, with_prior
from unclip.eval.outlines import is_right, read_images
from unclip.eval.protocol import val_pool
from unclip.eval.settings import settings_of
from unclip.eval.tables import json_safe, markdown
from unclip.loading import load
from unclip.pipeline import UnCLIPPipeline, embedding_of

log = logging.getLogger(__name__)

SPLITS = {"val": "seen", "val_unseen": "held-out"}
GROUPS = {"single": 1, "two": 2}
ATTRIBUTES = ("shape", "color", "position", "count")
COLUMNS = ["stage", "split", "objects", "n", *ATTRIBUTES, "acc", "acc_ci", "prompt", "prompt_ci", "outline"]


def wilson_half_width(p: float, n: int, z: float = 1.96) -> float:
    """Half the width of the 95 % Wilson score interval of a proportion p over n trials (Wilson 1927):
    unlike p ± z√(p(1-p)/n) it stays inside [0, 1] and is honest near 0 and 1."""
    if n == 0 or math.isnan(p):
        return math.nan
    return z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)


# ------------------------------------------------------------------------------------ the pools
class Pool:
    """One val split in memory: real images (at the decoder's resolution), their z_i, captions and what
    each caption names (``asked``) and each image holds (``objects``)."""

    def __init__(self, batches_: list[dict]):
        self.images = torch.cat([b["image"].float() for b in batches_])
        self.z_img = torch.cat([b["img_emb"].float() for b in batches_])
        self.captions = [c for b in batches_ for c in b["caption"]]
        metas = [m for b in batches_ for m in b["meta"]]
        if any("objects" not in m for m in metas):
            raise ValueError("mode=breakdown needs the shapes data's KEY.json objects (python -m unclip.data.shapes)")
        self.objects = [m["objects"] for m in metas]
        self.asked = [named_objects(m) for m in metas]

    def __len__(self) -> int:
        return len(self.captions)


def load_pools(cfg: DictConfig, size: int, count: int) -> dict[str, Pool]:
    datamodule = instantiate(cfg.data, _convert_="all", train=cfg.data.val, fields=["img_emb", "caption", "image", "meta"],
                             image_size=size, batch_size=cfg.data.val_batch_size)
    pools = {split: Pool(b) for split, b in val_pool(datamodule, count).items() if b}
    if not pools:
        raise ValueError("mode=breakdown found no val rows: the data config has no val / val_unseen shards")
    return pools


# ------------------------------------------------------------------------------------- scoring
def count_hits(pred: CellPredictions, objects: Sequence[Sequence[dict]]) -> list[bool]:
    """Whether each image holds exactly as many objects as it should."""
    drawn = (pred.shape != EMPTY).sum(-1)
    return [int(drawn[i]) == len(o) for i, o in enumerate(objects)]


def score_rows(stage: str, split: str, pred: CellPredictions, pool: Pool, pixels: torch.Tensor | None = None) -> list[dict]:
    """One row per object-count group of the pool, from the classifier's per-cell predictions; with the
    ``pixels`` it read, also ``outline``: the share of images whose every object the outline reader finds in its
    named shape and colour, with nothing else drawn (unclip.eval.outlines, a check with no weights)."""
    rows = []
    counts = count_hits(pred, pool.objects)
    outlines = None if pixels is None else [is_right(read, asked) for read, asked in zip(read_images(pixels), pool.asked)]
    for group, k in GROUPS.items():
        index = [i for i, o in enumerate(pool.objects) if len(o) == k]
        if not index:
            continue
        metrics = score_predictions(pred.subset(index), [pool.asked[i] for i in index])
        rows.append(row(stage, split, group, len(index), {
            "shape": metrics["attr_shape"], "color": metrics["attr_color"], "position": metrics["attr_position"],
            "count": sum(counts[i] for i in index) / len(index), "acc": metrics["attr_acc"],
            "prompt": metrics["attr_prompt"]}, n_objects=metrics["n_objects"]))
        if outlines is not None:
            rows[-1]["outline"] = mean([outlines[i] for i in index])
        if group == "single":
            rows[-1]["by_shape"] = {shape: score_predictions(pred.subset(ids), [pool.asked[i] for i in ids])["attr_shape"]
                                    for shape, ids in by_shape(pool, index).items()}
    return rows


def by_shape(pool: Pool, index: list[int]) -> dict[str, list[int]]:
    """The one-object images of ``index`` grouped by their object's shape (every shape, perhaps with none)."""
    return {shape: [i for i in index if pool.objects[i][0]["shape"] == shape] for shape in VOCAB.shapes}


def row(stage: str, split: str, group: str, n: int, metrics: dict, n_objects: int | None = None) -> dict:
    out = {"stage": stage, "split": SPLITS.get(split, split), "objects": group, "n": n, **metrics}
    out["acc_ci"] = wilson_half_width(out.get("acc", math.nan), n_objects or n)
    out["prompt_ci"] = wilson_half_width(out.get("prompt", math.nan), n)
    return out


# ------------------------------------------------------------------------------- CLIP zero-shot
def phrase(obj: dict, **change) -> str:
    obj = {**obj, **change}
    return f"{{a}} {obj['size']} {obj['color']} {obj['shape']} in the {obj['position']}"


def caption_of(objects: Sequence[dict]) -> str:
    return with_articles(" and ".join(objects))


def other_object(obj: dict) -> dict:
    """A second object for a one-object image's "two objects" caption: another shape, colour and cell."""
    shift = lambda values, v: values[(values.index(v) + 1) % len(values)]  # noqa: E731
    return {"shape": shift(VOCAB.shapes, obj["shape"]), "color": shift(VOCAB.colors, obj["color"]),
            "size": obj["size"], "position": shift(VOCAB.positions, obj["position"])}


def zero_shot_candidates(objects: Sequence[dict], attribute: str) -> tuple[list[str], int]:
    """Captions of an image that differ from the true one only in ``attribute`` of its first object (for
    ``count``: the first object alone or with a second), and the index of the true one."""
    first, rest = objects[0], [phrase(o) for o in objects[1:]]
    if attribute == "count":
        second = rest[0] if rest else phrase(other_object(first))
        return [caption_of([phrase(first)]), caption_of([phrase(first), second])], len(objects) - 1
    values = {"shape": VOCAB.shapes, "color": VOCAB.colors, "position": VOCAB.positions}[attribute]
    captions = [caption_of([phrase(first, **{attribute: v}), *rest]) for v in values]
    return captions, list(values).index(first[attribute])


@torch.no_grad()
def zero_shot_rows(clip, split: str, pool: Pool) -> list[dict]:
    z_img = clip.encode_image(pool.images)
    hits = {a: [] for a in ATTRIBUTES}
    for i, objects in enumerate(pool.objects):
        for attribute in ATTRIBUTES:
            captions, truth = zero_shot_candidates(objects, attribute)
            z_txt = clip.encode_text(captions).z_txt.float()
            hits[attribute].append(int((z_txt @ z_img[i].float()).argmax()) == truth)
    rows = []
    for group, k in GROUPS.items():
        index = [i for i, o in enumerate(pool.objects) if len(o) == k]
        if index:
            metrics = {a: sum(hits[a][i] for i in index) / len(index) for a in ATTRIBUTES}
            metrics["acc"] = sum(hits["shape"][i] and hits["color"][i] for i in index) / len(index)
            rows.append(row("clip_zero_shot", split, group, len(index), metrics))
            if group == "single":
                rows[-1]["by_shape"] = {shape: mean([hits["shape"][i] for i in ids]) for shape, ids in by_shape(pool, index).items()}
    return rows


def mean(values: list) -> float:
    return sum(values) / len(values) if values else math.nan


# ----------------------------------------------------------------------------------- generation
@torch.no_grad()
def upsample(pipe: UnCLIPPipeline, pixels: torch.Tensor, seed: int, batch_size: int, z_img: torch.Tensor) -> torch.Tensor:
    """The pixels through every upsampler in turn (seeded by (seed, "upsampler", b)); ``z_img``, the embeddings
    they show, for upsamplers that read them."""
    out = []
    for index, rows in batches(len(pixels), batch_size):
        generator = seeded(seed, "upsampler", index, device=pipe.device)
        x = pixels[rows].to(pipe.device)
        for upsampler in pipe.upsamplers:
            x = upsampler.upsample(x, generator=generator, **embedding_of(upsampler, z_img[rows], None))
        out.append(x.float().cpu())
    return torch.cat(out)


def stage_labels(specs: Sequence, priors: Sequence) -> list[str]:
    """Each prior's row label: its kind, or its spec where two priors share a kind."""
    kinds = [p.kind for p in priors]
    return [k if kinds.count(k) == 1 else str(s) for s, k in zip(specs, kinds)]


# ------------------------------------------------------------------------------------ mode=breakdown
def run_breakdown(cfg: DictConfig, clip) -> list[dict]:
    # compose=NAME: each prior's end-to-end row again with captions drawn as conjunctions of their parts
    composer = splitter_named(cfg.compose) if cfg.get("compose") else None
    layout = bool(cfg.get("layout", False))
    composed = f"composed ({cfg.get('compose')}{', layout' if layout else ''})"
    decoder = load(cfg.decoder, clip=clip, artifacts=cfg.paths.artifacts)
    upsamplers = [load(spec, clip=clip, artifacts=cfg.paths.artifacts) for spec in cfg.upsamplers]
    precision = cfg.get("precision", "32-true")
    pipe = UnCLIPPipeline(clip, decoder, None, upsamplers, precision=precision)
    classifier = load_classifier(cfg.classifier)
    seed, batch_size = int(cfg.seed), int(cfg.batch_size)
    decoder_settings = settings_of(cfg.decoder_settings)
    prior_settings = {k: v for k, v in settings_of(cfg.prior_settings).items() if v is not None}
    priors = [load_prior(spec, clip, cfg.paths.artifacts, cfg.data.cache_dir) for spec in cfg.priors]
    pools = load_pools(cfg, decoder.net.config.image_size, int(cfg.breakdown_pool))
    plain = UnCLIPPipeline(clip, decoder, None, precision=precision)  # the decoder alone: its own resolution, for decoder_true_zi
    rows = []
    for split, pool in pools.items():
        log.info("breakdown: %s, %d pairs", split, len(pool))
        rows += score_rows("real", split, predict(classifier, pool.images), pool, pool.images)
        if upsamplers:  # the upsamplers given what the decoder should have drawn
            upsampled = upsample(pipe, pool.images, seed, batch_size, pool.z_img)
            rows += score_rows("upsampled_real", split, predict(classifier, upsampled), pool, upsampled)
        rows += zero_shot_rows(clip, split, pool)
        decoded, _ = decode_embeddings(plain, pool.z_img, pool.captions, seed, decoder_settings, batch_size)
        rows += score_rows("decoder_true_zi", split, predict(classifier, decoded), pool, decoded)
        if upsamplers:
            upsampled = upsample(pipe, decoded, seed, batch_size, pool.z_img)
            rows += score_rows("upsampled", split, predict(classifier, upsampled), pool, upsampled)
        for name, prior in zip(stage_labels(cfg.priors, priors), priors):
            prior_pipe = with_prior(pipe, prior)
            z_img, _ = sample_embeddings(prior_pipe, pool.captions, seed, prior_settings, batch_size)
            pixels, _ = decode_embeddings(prior_pipe, z_img, pool.captions, seed, decoder_settings, batch_size)
            rows += score_rows(name, split, predict(classifier, pixels), pool, pixels)
            if composer is not None:
                pixels = compose_images(prior_pipe, pool.captions, seed, composer, layout, prior_settings,
                                        decoder_settings, batch_size)
                rows += score_rows(f"{name} {composed}", split, predict(classifier, pixels), pool, pixels)
        write(rows, Path(cfg.out))  # after each split: a long run's first half is on disk early
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "breakdown.json").write_text(json.dumps(json_safe(rows), indent=1))
    table = markdown(rows, COLUMNS)
    # which shapes a stage loses (the demo's CLIP takes circles for hexagons): shape right per object shape
    singles = [{"stage": r["stage"], "split": r["split"], **r["by_shape"]} for r in rows if "by_shape" in r]
    shapes_table = "\nShape right on one-object images, by the object's shape:\n\n" + markdown(singles, ["stage", "split", *VOCAB.shapes])
    (out / "breakdown.md").write_text(table + shapes_table)
    print(table + shapes_table)
