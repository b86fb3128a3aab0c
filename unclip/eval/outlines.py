"""A second reader of the shapes pictures, with no learned weights. Each object is a connected region of
saturated pixels (the generator's backgrounds are muted, its objects saturated); its colour is named by hue,
and its shape by which of the generator's own outlines (``unclip.data.shapes.polygon``), scaled to the region's
area, centred on it and turned within the generator's range, overlaps it best. It checks the attribute
classifier, which learned what real images look like and may read a decoder's artefacts in ways that a reader
of outlines does not (and the other way round): the demo grid (``unclip.demo_grids``) and ``mode=breakdown`` are
scored by both."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from unclip.data.shapes import COLORS, SHAPES, draw_object, polygon

SUPERSAMPLE = 8                                  # template coverage resolved to 1/64 of a pixel
ANGLES = tuple(np.linspace(-0.3, 0.3, 7))       # the generator turns a polygon by up to ±0.15 rad
SATURATED = 0.2                                  # chroma (max - min of RGB in [0, 1]): objects >= 0.35, backgrounds <= 0.09
MIN_AREA = 16 / 64 ** 2                          # a region smaller than a quarter of the smallest star is a speck
SPLIT_AREA = 48 / 64 ** 2                        # a second colour this large in one region is a second object,
SPLIT_HUE = 20.0                                 # if its hue is this far (degrees) from the first's (named ones: 28-65)
FRINGE_OVERLAP = 0.3                             # and if some outline fits it this well (objects: 0.5-0.97)
MARGIN = 3                                       # pixels around a region that its fit looks at


@dataclass(frozen=True)
class Outline:
    """One object as read: its shape and colour, area in pixels, centre (x, y) in pixels and the overlap
    (soft IoU) of every shape's best-placed outline with it."""

    shape: str
    color: str
    area: float
    centre: tuple[float, float]
    overlap: dict[str, float]


def _unit_area(shape: str) -> float:
    """The area of ``shape`` drawn at radius 1 (the shoelace formula on its polygon)."""
    if shape == "circle":
        return math.pi
    points = polygon(shape, 0.0, 0.0, 1.0, 0.0)
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1])))


UNIT_AREA = {shape: _unit_area(shape) for shape in SHAPES}


def _regions(mask: np.ndarray) -> np.ndarray:
    """8-connected labels of a boolean (H, W) mask: each region gets the largest pixel id within it."""
    h, w = mask.shape
    keep = torch.from_numpy(mask)[None, None].float()
    labels = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * keep
    while True:  # ids spread to their neighbours until every region holds one
        spread = F.max_pool2d(labels, 3, stride=1, padding=1) * keep
        if torch.equal(spread, labels):
            return labels[0, 0].long().numpy()
        labels = spread


def _template(shape: str, centre: tuple[float, float], radius: float, angle: float, box: tuple[int, int, int, int]) -> np.ndarray:
    """Coverage in [0, 1] of each pixel of ``box`` (x0, y0, x1, y1) by ``shape``, drawn by the generator's own code."""
    x0, y0, x1, y1 = box
    canvas = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    geometry = [centre[0] - x0, centre[1] - y0, radius, angle]  # in pixels of the box: draw_object scales them
    draw_object(ImageDraw.Draw(canvas), {"shape": shape, "rgb": (255,), "geometry": geometry}, SUPERSAMPLE, rng=None)
    return np.asarray(canvas.resize((x1 - x0, y1 - y0), Image.Resampling.BOX), dtype=np.float32) / 255


HUES = np.array([COLORS[name][0] for name in COLORS], dtype=np.float32)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> hue in degrees."""
    top, low = rgb.max(-1), rgb.min(-1)
    span = np.maximum(top - low, 1e-6)
    r, g, b = np.moveaxis(rgb, -1, 0)
    return np.where(top == r, (g - b) / span % 6, np.where(top == g, (b - r) / span + 2, (r - g) / span + 4)) * 60


def _hue_gap(a: float, b: float) -> float:
    return min(abs(a - b), 360 - abs(a - b))


def _mean_hue(hues: np.ndarray) -> float:
    angles = np.deg2rad(hues)
    return float(np.rad2deg(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360)


def _hue_class(hue: np.ndarray) -> np.ndarray:
    """Hues in degrees -> index (in ``COLORS``) of the named colour nearest in hue."""
    distance = np.abs(hue[..., None] - HUES)
    return np.minimum(distance, 360 - distance).argmin(-1)


def _color_name(rgb: np.ndarray) -> str:
    return list(COLORS)[int(_hue_class(_hue(rgb)))]


def _chroma(rgb: np.ndarray) -> np.ndarray:
    return rgb.max(-1) - rgb.min(-1)


def _fit(rgb: np.ndarray, chroma: np.ndarray, background: np.ndarray, region: np.ndarray, others: np.ndarray) -> Outline | None:
    """Reads one region: its core colour, its soft coverage (the projection of each pixel onto core - background,
    linear in an edge pixel's share of object), and the shape whose outline overlaps that coverage best."""
    inside = rgb[region]
    core = np.median(inside[chroma[region] >= np.median(chroma[region])], axis=0)
    ys, xs = np.nonzero(region)
    h, w = region.shape
    box = (max(0, xs.min() - MARGIN), max(0, ys.min() - MARGIN), min(w, xs.max() + 1 + MARGIN), min(h, ys.max() + 1 + MARGIN))
    x0, y0, x1, y1 = box
    direction = core - background
    coverage = ((rgb[y0:y1, x0:x1] - background) @ direction) / max(float(direction @ direction), 1e-6)
    coverage = np.clip(coverage, 0.0, 1.0) * ~others[y0:y1, x0:x1]
    area = float(coverage.sum())
    if area < 1.0:  # no colour apart from the background's (a grey-ish region): nothing drawn there
        return None
    gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
    centre = (float((coverage * gx).sum() / area), float((coverage * gy).sum() / area))
    overlap = {}
    for shape in SHAPES:
        radius = math.sqrt(area / UNIT_AREA[shape])
        best = 0.0
        for angle in (0.0,) if shape == "circle" else ANGLES:
            t = _template(shape, centre, radius, angle, box)
            best = max(best, float(np.minimum(coverage, t).sum() / np.maximum(coverage, t).sum()))
        overlap[shape] = round(best, 4)
    return Outline(max(overlap, key=overlap.get), _color_name(core), area, centre, overlap)


def _split_by_colour(labels: np.ndarray, hue: np.ndarray) -> np.ndarray:
    """Two touching objects of different colours are one region: a region holding two named colours, each over
    ``SPLIT_AREA`` of the image and ``SPLIT_HUE`` apart in mean hue, becomes one region per such colour (what
    else it holds, an edge's blend, goes to neither). Fewer pixels of another hue, or a hue drifting across a
    colour's border, are one object's edge or shading, not a second object."""
    out = labels.copy()
    hue_class = _hue_class(hue)
    for region in np.unique(labels[labels > 0]):
        inside = labels == region
        classes, counts = np.unique(hue_class[inside], return_counts=True)
        big = classes[counts >= SPLIT_AREA * labels.size]
        means = [_mean_hue(hue[inside & (hue_class == c)]) for c in big]
        if len(big) > 1 and min(_hue_gap(a, b) for a, b in itertools.combinations(means, 2)) >= SPLIT_HUE:
            out[inside] = 0
            for c in big:
                out[inside & (hue_class == c)] = labels.size * (1 + int(c)) + region
    return out


def read_image(image: np.ndarray) -> list[Outline]:
    """(H, W, 3) RGB in [0, 1] -> its objects, largest first."""
    background = np.median(np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)
    chroma = _chroma(image)
    labels = _split_by_colour(_regions(chroma >= SATURATED), _hue(image))
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    keep = [i for i, n in zip(ids, counts) if n >= MIN_AREA * labels.size]
    read = [(_fit(image, chroma, background, labels == i, (labels > 0) & (labels != i)), i > labels.size) for i in keep]
    # a part split off by colour that fits no outline is a colour fringe of its neighbour, not an object
    objects = [o for o, split in read if o is not None and not (split and max(o.overlap.values()) < FRINGE_OVERLAP)]
    return sorted(objects, key=lambda o: -o.area)


def read_images(pixels: torch.Tensor) -> list[list[Outline]]:
    """(B, 3, H, W) in [-1, 1], as the pipeline and the shards' loaders give them -> each image's objects."""
    images = ((pixels.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
    return [read_image(image) for image in images]


def is_right(read: list[Outline], asked: list[dict]) -> bool:
    """Every asked object is there in its shape and colour (where asked), and nothing else is."""
    if len(read) != len(asked):
        return False
    return any(all(obj.get(k) in (None, getattr(o, k)) for obj, o in zip(asked, order) for k in ("shape", "color"))
               for order in itertools.permutations(read))


def check_shard(path: str, limit: int = 500, size: int | None = None) -> dict:
    """The reader on a shapes shard's real images (``size``: through that resolution and back, as the decoder
    draws): the share of images read right, and of one-object images read right per shape and size."""
    import io
    import json
    from collections import defaultdict

    import webdataset as wds

    right, by_kind = [], defaultdict(list)
    for sample in itertools.islice(wds.tariterators.tarfile_samples([{"url": path}]), limit):
        data = next(sample[k] for k in ("png", "jpg", "jpeg", "webp") if k in sample)
        image = Image.open(io.BytesIO(data)).convert("RGB")
        if size:
            image = image.resize((size, size), Image.Resampling.BICUBIC).resize(image.size, Image.Resampling.BICUBIC)
        objects = json.loads(sample["json"])["objects"]
        right.append(is_right(read_image(np.asarray(image, dtype=np.float32) / 255), objects))
        if len(objects) == 1:
            by_kind[f"{objects[0]['size']} {objects[0]['shape']}"].append(right[-1])
    return {"images": len(right), "right": sum(right) / max(len(right), 1),
            "one_object": {k: f"{sum(v)}/{len(v)}" for k, v in sorted(by_kind.items())}}


if __name__ == "__main__":  # python -m unclip.eval.outlines SHARD.tar [limit=500] [size=32]
    import sys

    options = dict(arg.split("=", 1) for arg in sys.argv[2:])
    print(check_shard(sys.argv[1], int(options.get("limit", 500)), int(options["size"]) if "size" in options else None))
