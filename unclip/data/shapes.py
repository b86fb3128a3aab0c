"""Built-in synthetic caption-image pairs: coloured shapes on plain backgrounds.

Writes webdataset shards in the img2dataset layout (``KEY.png``, ``KEY.txt``, ``KEY.json``), so every
stage runs end to end without a download. The captions come from several templates and synonyms so a
prior has to read them rather than look them up.

    python -m unclip.data.shapes out=DIR n=10000 size=64 shards=8

Writes ``DIR/train-00000.tar ...``, ``DIR/val-00000.tar ...`` (seen compositions) and
``DIR/val_unseen-00000.tar ...`` (the held-out [shape, colour] pairs, never in train), and
``DIR/manifest.json`` with the generator settings and per-shard sample counts.
"""

from __future__ import annotations

import colorsys
import io
import json
import math
import os
import random
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw

# One vocabulary serves captions, zero-shot prompts, classifiers and prompt suites.
# Each attribute value maps to the words that may name it in a caption; the first word is canonical.
SHAPES = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "wedge"],
    "star": ["star", "five-pointed star"],
    "hexagon": ["hexagon", "six-sided shape"],
    "diamond": ["diamond", "rhombus", "lozenge"],
}
COLORS = {  # hue in degrees, saturation, value, synonyms
    "red": (0, 0.9, 0.9, ["red", "crimson", "scarlet"]),
    "orange": (30, 0.95, 0.95, ["orange", "tangerine"]),
    "yellow": (58, 0.9, 0.95, ["yellow", "golden", "lemon"]),
    "green": (120, 0.85, 0.75, ["green", "emerald"]),
    "cyan": (185, 0.9, 0.9, ["cyan", "turquoise", "aqua"]),
    "blue": (225, 0.9, 0.9, ["blue", "navy", "azure"]),
    "purple": (280, 0.75, 0.75, ["purple", "violet"]),
    "pink": (325, 0.6, 0.98, ["pink", "magenta", "rose"]),
}
SIZES = {  # radius as a fraction of the image side
    "small": (0.10, ["small", "tiny", "little"]),
    "medium": (0.14, ["medium", "medium-sized", "mid-sized"]),
    "large": (0.19, ["large", "big", "huge"]),
}
POSITIONS = {  # (column, row) of a 3x3 grid
    "top left": ((0, 0), ["top left", "upper left"]),
    "top": ((1, 0), ["top", "top middle"]),
    "top right": ((2, 0), ["top right", "upper right"]),
    "left": ((0, 1), ["left", "middle left"]),
    "center": ((1, 1), ["center", "middle"]),
    "right": ((2, 1), ["right", "middle right"]),
    "bottom left": ((0, 2), ["bottom left", "lower left"]),
    "bottom": ((1, 2), ["bottom", "bottom middle"]),
    "bottom right": ((2, 2), ["bottom right", "lower right"]),
}


@dataclass(frozen=True)
class Vocab:
    shapes: tuple[str, ...] = tuple(SHAPES)
    colors: tuple[str, ...] = tuple(COLORS)
    sizes: tuple[str, ...] = tuple(SIZES)
    positions: tuple[str, ...] = tuple(POSITIONS)


VOCAB = Vocab()

# Caption templates for one object. Template ids are stored in KEY.json so evaluations can hold some
# templates out; {a} is the article that fits the next word.
TEMPLATES = [
    "{a} {size} {color} {shape} in the {position}",
    "{position}: {size} {color} {shape}",
    "{a} {color} {shape}, {size}, at the {position}",
    "a picture of {a} {size} {color} {shape} in the {position}",
    "{a} {color} {shape} in the {position}",
    "{a} {size} {color} {shape}",
    "{a} {color} {shape}",  # what people type: size and position left to the model, one object all the same
]
# Two objects: each object phrase is "{size} {color} {shape} in the {position}".
PAIR_TEMPLATES = [
    "{obj1} and {obj2}",
    "{obj1}, next to {obj2}",
]

DEFAULT_HOLDOUT = (("star", "green"), ("circle", "purple"), ("triangle", "cyan"), ("square", "pink"))
# Shapes the renderer draws nearly alike at 32-64 px: a hexagon is a ring of six points at 1.05 r, a circle of
# radius r. The demo's CLIP puts most circle images nearer "hexagon" than "circle" (README, "Demo").
LOOKALIKE_SHAPES = {"circle": "hexagon", "hexagon": "circle"}


@dataclass
class ShapesConfig:
    out: str = "outputs/data/shapes"
    n: int = 10_000  # training samples; val sizes below
    n_val: int = 1_000
    n_val_unseen: int = 1_000
    size: int = 64
    shards: int = 8  # training shards; val splits get max(1, shards // 4) each
    seed: int = 0
    p_two: float = 0.25  # probability of a two-object image
    synonyms: bool = True  # False: canonical words only
    holdout: list = field(default_factory=lambda: [list(p) for p in DEFAULT_HOLDOUT])
    image_format: str = "png"
    supersample: int = 4  # draw at size*supersample, then downsample: smooth edges


def object_color(name: str, rng: random.Random) -> tuple[int, int, int]:
    hue, sat, val, _ = COLORS[name]
    hue = (hue + rng.uniform(-6, 6)) % 360
    sat = min(1.0, max(0.0, sat + rng.uniform(-0.08, 0.05)))
    val = min(1.0, max(0.0, val + rng.uniform(-0.08, 0.05)))
    r, g, b = colorsys.hsv_to_rgb(hue / 360, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def background_color(rng: random.Random) -> tuple[int, int, int]:
    """A muted, low-saturation colour, so that no object colour can vanish into it."""
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.15), rng.choice([rng.uniform(0.08, 0.3), rng.uniform(0.45, 0.6)])
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    def ring(n: int, radius_of, offset: float):
        return [
            (cx + radius_of(i) * math.cos(offset + 2 * math.pi * i / n), cy + radius_of(i) * math.sin(offset + 2 * math.pi * i / n))
            for i in range(n)
        ]

    if shape == "square":
        return ring(4, lambda i: r * 1.15, math.pi / 4 + angle)
    if shape == "diamond":
        return [(cx, cy - r * 1.2), (cx + r * 0.75, cy), (cx, cy + r * 1.2), (cx - r * 0.75, cy)]
    if shape == "triangle":
        return ring(3, lambda i: r * 1.2, -math.pi / 2 + angle)
    if shape == "hexagon":
        return ring(6, lambda i: r * 1.05, angle)
    if shape == "star":
        return ring(10, lambda i: r * 1.25 if i % 2 == 0 else r * 0.5, -math.pi / 2 + angle)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def object_geometry(obj: dict, rng: random.Random) -> list[float]:
    """Where and how large an object is drawn: centre x, y and radius as fractions of the image side, and the
    polygon's turn (0 for a circle, which draws none). Kept in KEY.json, so an image can be redrawn."""
    col, row = POSITIONS[obj["position"]][0]
    cx = (col + 0.5 + rng.uniform(-0.12, 0.12)) / 3
    cy = (row + 0.5 + rng.uniform(-0.12, 0.12)) / 3
    r = SIZES[obj["size"]][0] * rng.uniform(0.92, 1.08)
    return [cx, cy, r, 0.0 if obj["shape"] == "circle" else rng.uniform(-0.15, 0.15)]


def draw_object(draw: ImageDraw.ImageDraw, obj: dict, scale: float, rng: random.Random) -> None:
    """Draws ``obj`` at its stored ``geometry``, drawing and storing one first when it has none."""
    if "geometry" not in obj:
        obj["geometry"] = object_geometry(obj, rng)
    cx, cy, r = (v * scale for v in obj["geometry"][:3])
    fill = tuple(obj["rgb"])
    if obj["shape"] == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon(obj["shape"], cx, cy, r, obj["geometry"][3]), fill=fill)


def render(objects: list[dict], background: tuple[int, int, int], size: int, supersample: int, rng: random.Random) -> Image.Image:
    big = size * supersample
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj, big, rng)
    return image.resize((size, size), Image.Resampling.LANCZOS) if supersample > 1 else image


def counterfactual_image(meta: dict, index: int, shape: str) -> Image.Image:
    """The image of ``meta`` (a KEY.json) with object ``index`` drawn as ``shape``, everything else as it was, and
    through the same encoding as the original: an image hard negative (TripletCLIP, Patel et al. 2024) that differs
    from the real one only in that object's outline, so no rendering or compression trace tells the two apart."""
    if any("geometry" not in o for o in meta.get("objects") or [{}]) or "render" not in meta:
        raise ValueError("a counterfactual image needs each object's \"geometry\" and the \"render\" settings in KEY.json, "
                         "which python -m unclip.data.shapes writes since 2026-12-07: regenerate the shapes data")
    objects = [dict(o) for o in meta["objects"]]
    objects[index]["shape"] = shape
    settings = meta["render"]
    image = render(objects, tuple(meta["background"]), settings["size"], settings["supersample"], random.Random(0))
    if settings["format"] == "png":  # lossless: the decoded shard image is the rendered one
        return image
    return Image.open(io.BytesIO(encode_image(image, settings["format"]))).convert("RGB")


def counterfactual_shape(meta: dict, rng: random.Random, forbidden=DEFAULT_HOLDOUT) -> tuple[int, str]:
    """(object index, new shape) for an image hard negative: one object, its look-alike where it has one
    (``LOOKALIKE_SHAPES``, the pair the image tower most confuses), else any other shape; never a ``forbidden``
    [shape, colour] pair, so held-out compositions stay unseen."""
    forbidden = {tuple(p) for p in forbidden}
    i = rng.randrange(len(meta["objects"]))
    obj = meta["objects"][i]
    choices = [s for s in VOCAB.shapes if s != obj["shape"] and (s, obj["color"]) not in forbidden]
    twin = LOOKALIKE_SHAPES.get(obj["shape"])
    return i, twin if twin in choices else rng.choice(choices)


def word(table: dict, value: str, rng: random.Random, synonyms: bool) -> str:
    words = table[value][-1] if isinstance(table[value], tuple) else table[value]
    return rng.choice(words) if synonyms else words[0]


def with_articles(text: str) -> str:
    """Replaces each ``{a}`` marker by "a" or "an", whichever fits the word after it."""
    return re.sub(r"\{a\} (\w)", lambda m: ("an " if m.group(1) in "aeiou" else "a ") + m.group(1), text)


def caption_for(objects: list[dict], template: int, rng: random.Random, synonyms: bool) -> str:
    def phrase(obj: dict) -> dict:
        return {
            "shape": word(SHAPES, obj["shape"], rng, synonyms),
            "color": word(COLORS, obj["color"], rng, synonyms),
            "size": word(SIZES, obj["size"], rng, synonyms),
            "position": word(POSITIONS, obj["position"], rng, synonyms),
        }

    if len(objects) == 1:
        return with_articles(TEMPLATES[template].format(a="{a}", **phrase(objects[0])))
    parts = ["{{a}} {size} {color} {shape} in the {position}".format(**phrase(obj)) for obj in objects]
    return with_articles(PAIR_TEMPLATES[template].format(obj1=parts[0], obj2=parts[1]))


def hard_negative_caption(meta: dict, rng: random.Random, forbidden=DEFAULT_HOLDOUT, lookalike: float = 0.0) -> str | None:
    """A caption of the image with one thing wrong, for contrastive hard negatives (NegCLIP, Yuksekgonul et
    al. 2023): one object's shape or colour changed, or, in a pair of differently coloured objects, the two
    colours swapped (the binding a bag-of-words text tower misses). Template and synonyms are drawn as for a
    real caption, so only the changed attribute tells the two apart. ``forbidden`` [shape, colour] pairs never
    appear (held-out compositions stay unseen, as text too); None when ``meta`` has no objects. A changed shape
    is the object's look-alike (``LOOKALIKE_SHAPES``) with probability ``lookalike``: the negative the image
    tower most needs, which a uniform draw names one time in five."""
    objects = [dict(o) for o in meta.get("objects") or []]
    if not objects or "template" not in meta:
        return None
    forbidden = {tuple(p) for p in forbidden}
    if len(objects) == 2 and objects[0]["color"] != objects[1]["color"] and rng.random() < 1 / 3:
        swapped = [{**objects[0], "color": objects[1]["color"]}, {**objects[1], "color": objects[0]["color"]}]
        if not any((o["shape"], o["color"]) in forbidden for o in swapped):
            return caption_for(swapped, meta["template"], rng, synonyms=True)
    i = rng.randrange(len(objects))
    attribute = rng.choice(("shape", "color"))
    values = VOCAB.shapes if attribute == "shape" else VOCAB.colors
    choices = [v for v in values if v != objects[i][attribute]
               and ((v, objects[i]["color"]) if attribute == "shape" else (objects[i]["shape"], v)) not in forbidden]
    # no extra draw at lookalike 0, so the negatives (and runs) of earlier recipes repeat exactly
    twin = LOOKALIKE_SHAPES.get(objects[i]["shape"]) if attribute == "shape" and lookalike > 0 else None
    objects[i][attribute] = twin if twin in choices and rng.random() < lookalike else rng.choice(choices)
    return caption_for(objects, meta["template"], rng, synonyms=True)


def sample_objects(rng: random.Random, p_two: float, allowed) -> list[dict]:
    """Draw 1 or 2 objects (distinct cells); ``allowed(shape, colour, index)`` filters compositions."""
    count = 2 if rng.random() < p_two else 1
    positions = rng.sample(VOCAB.positions, count)
    objects = []
    for i, position in enumerate(positions):
        while True:
            shape, color = rng.choice(VOCAB.shapes), rng.choice(VOCAB.colors)
            if allowed(shape, color, i):
                break
        objects.append({"shape": shape, "color": color, "size": rng.choice(VOCAB.sizes), "position": position})
    return objects


def make_sample(index: int, split: str, cfg: ShapesConfig, holdout: set) -> tuple[str, Image.Image, dict]:
    rng = random.Random(f"{cfg.seed}-{split}-{index}")
    if split == "val_unseen":
        # The first object is a held-out composition; a second one, if any, is ordinary.
        objects = sample_objects(rng, cfg.p_two, lambda s, c, i: ((s, c) in holdout) == (i == 0))
    else:
        objects = sample_objects(rng, cfg.p_two, lambda s, c, i: (s, c) not in holdout)
    for obj in objects:
        obj["rgb"] = list(object_color(obj["color"], rng))
    background = background_color(rng)
    template = rng.randrange(len(TEMPLATES) if len(objects) == 1 else len(PAIR_TEMPLATES))
    caption = caption_for(objects, template, rng, cfg.synonyms)
    image = render(objects, background, cfg.size, cfg.supersample, rng)
    meta = {"objects": objects, "background": list(background), "template": template, "split": split, "caption": caption,
            "render": {"size": cfg.size, "supersample": cfg.supersample, "format": cfg.image_format}}
    return caption, image, meta


def encode_image(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if fmt == "png" else "JPEG", **({"compress_level": 1} if fmt == "png" else {"quality": 95}))
    return buffer.getvalue()


def write_shard(out: Path, name: str, split: str, indices: range, cfg: ShapesConfig, holdout: set) -> int:
    """Writes samples ``indices`` of ``split`` to ``out/name`` atomically (a temporary name, then renamed)."""
    tmp = out / (name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for index in indices:
            caption, image, meta = make_sample(index, split, cfg, holdout)
            sink.write({"__key__": f"{split}{index:08d}", cfg.image_format: encode_image(image, cfg.image_format),
                        "txt": caption, "json": meta})
    tmp.rename(out / name)
    return len(indices)


def write_split(out: Path, split: str, n: int, shards: int, cfg: ShapesConfig, holdout: set, pool=None) -> dict[str, int]:
    """Writes ``n`` samples of ``split`` into ``shards`` tar files of near-equal size, through ``pool`` (an
    executor: shards side by side) when given; returns counts per shard. Each sample is drawn from its own
    seed, so the shards are the same however many are written at once."""
    plan, start = {}, 0
    for shard in range(shards):
        count = n // shards + (1 if shard < n % shards else 0)
        plan[f"{split}-{shard:05d}.tar"] = range(start, start + count)
        start += count
    if pool is None:
        return {name: write_shard(out, name, split, indices, cfg, holdout) for name, indices in plan.items()}
    jobs = {name: pool.submit(write_shard, out, name, split, indices, cfg, holdout) for name, indices in plan.items()}
    return {name: job.result() for name, job in jobs.items()}


def validate_holdout(holdout) -> set[tuple[str, str]]:
    pairs = set()
    for pair in holdout:
        shape, color = pair
        if shape not in SHAPES or color not in COLORS:
            raise ValueError(f"holdout pair {list(pair)} names an unknown shape or colour; shapes: {list(SHAPES)}, colours: {list(COLORS)}")
        pairs.add((shape, color))
    return pairs


def write_shapes(cfg: ShapesConfig, workers: int | None = None) -> Path:
    """Writes all splits and ``manifest.json``; skips the work when an identical manifest is present. Shards are
    written by ``workers`` processes side by side (default: one a core)."""
    out = Path(cfg.out)
    manifest_path = out / "manifest.json"
    settings = asdict(cfg)
    settings.pop("out")
    if manifest_path.exists() and json.loads(manifest_path.read_text()).get("settings") == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    holdout = validate_holdout(cfg.holdout)
    val_shards = max(1, cfg.shards // 4)
    counts = {}
    workers = workers or os.cpu_count() or 1
    with ProcessPoolExecutor(workers) if workers > 1 else nullcontext() as pool:
        counts.update(write_split(out, "train", cfg.n, cfg.shards, cfg, holdout, pool))
        counts.update(write_split(out, "val", cfg.n_val, val_shards, cfg, holdout, pool))
        if holdout and cfg.n_val_unseen:
            counts.update(write_split(out, "val_unseen", cfg.n_val_unseen, val_shards, cfg, holdout, pool))
    manifest_path.write_text(json.dumps({"settings": settings, "counts": counts}, indent=1))
    return out


def parse_cli(argv: list[str]) -> ShapesConfig:
    """``key=value`` arguments, Hydra-style; values parse as YAML (numbers, lists, booleans)."""
    import yaml

    cfg = ShapesConfig()
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not hasattr(cfg, key):
            known = ", ".join(ShapesConfig.__dataclass_fields__)
            raise SystemExit(f"unclip.data.shapes: bad argument {arg!r}; expected key=value with key among: {known}")
        setattr(cfg, key, yaml.safe_load(value))
    return cfg


def main(argv: list[str] | None = None) -> None:
    import time

    cfg = parse_cli(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    out = write_shapes(cfg)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    print(f"wrote {sum(counts.values())} samples in {len(counts)} shards to {out} ({time.perf_counter() - start:.1f}s)")


if __name__ == "__main__":
    main()
