"""Decoding one caption-image sample: only the members a stage needs, joined to its cache rows by key.
A bad sample raises :class:`SkipSample`; the stream counts it in a :class:`SkipCounter` and goes on."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from unclip.data.cache import EMBEDDING_MEMBERS

log = logging.getLogger(__name__)

# every cache member a batch can carry (txt_tok: (L, W) caption token states, when the cache holds them)
EMBEDDING_FIELDS = tuple(EMBEDDING_MEMBERS)
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


class SkipCounter:
    """Counts skipped samples by reason, warns about the first few, and hands out deltas per batch."""

    def __init__(self, warn_first: int = 5):
        self.pending: Counter = Counter()
        self.total: Counter = Counter()
        self.warn_first = warn_first

    def skip(self, reason: str, detail: str) -> None:
        self.pending[reason] += 1
        self.total[reason] += 1
        if self.total[reason] <= self.warn_first:
            log.warning("skipped sample (%s): %s", reason, detail)

    def handler(self, reason: str):
        """A webdataset handler that counts the exception and continues."""
        def handle(exn: Exception) -> bool:
            self.skip(reason, repr(exn))
            return True
        return handle

    def take(self) -> dict[str, int]:
        delta, self.pending = dict(self.pending), Counter()
        return delta



def tar_samples(url: str, skips: SkipCounter) -> Iterator[tuple[dict, bool]]:
    """(sample, cut_short) for each sample of a source tar. A tar that cannot be read to its end (truncated,
    damaged) counts once, as ``bad_tar_member``; the samples that come after the read error are the one it
    cut short, flagged so that its missing members are not counted a second time."""
    broken: list[Exception] = []

    def on_error(exn: Exception) -> bool:
        if not broken:
            skips.skip("bad_tar_member", f"{url}: {exn!r}")
        broken.append(exn)
        return True

    for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=on_error):
        yield sample, bool(broken)


def decode_rgb(data: bytes, size: int | None) -> torch.Tensor:
    """PNG/JPEG bytes -> (3, size, size) float in [-1, 1] (centre crop to square, antialiased resize)."""

    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if size is not None and img.size != (size, size):
            side = min(img.size)
            left, top = (img.width - side) // 2, (img.height - side) // 2
            img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC, reducing_gap=None)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def image_member(sample: dict) -> str | None:
    return next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)


class SkipSample(Exception):
    """Raised while decoding one sample; the reason names the counter it goes to."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def decode_source_sample(sample: dict, want: set[str], image_size: int | None, lowres_size: int | None,
                         embeddings, dims: dict[str, int] | None) -> dict:
    """Decodes only what the stage needs from one source sample and joins its embeddings by key."""
    key = sample["__key__"]
    out: dict = {"key": key}
    caption = sample.get("txt")
    if caption is None:
        raise SkipSample("missing_caption", f"{key} in {sample.get('__url__')} has no .txt")
    caption = caption.decode("utf-8", errors="replace").strip() if isinstance(caption, bytes) else str(caption).strip()
    if not caption:
        raise SkipSample("empty_caption", f"{key} in {sample.get('__url__')} has an empty caption")
    out["caption"] = caption
    if "meta" in want:
        try:
            out["meta"] = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError as exn:
            raise SkipSample("bad_json", f"{key} in {sample.get('__url__')}: {exn}") from exn
    if want & {"image", "image_lowres"}:
        ext = image_member(sample)
        if ext is None:
            raise SkipSample("missing_image", f"{key} in {sample.get('__url__')} has no image member")
        try:
            image = decode_rgb(sample[ext], image_size)
        except Exception as exn:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise SkipSample("corrupt_image", f"{key} in {sample.get('__url__')}: {exn!r}") from exn
        if "image" in want:
            out["image"] = image
        if "image_lowres" in want:
            out["image_lowres"] = torch.nn.functional.interpolate(image[None], size=(lowres_size, lowres_size), mode="bicubic",
                                                                  antialias=True, align_corners=False)[0].clamp(-1, 1)
    if embeddings is not None:
        rows = embeddings.lookup(key)
        if rows is None:
            raise SkipSample("missing_embedding", f"{key} of {sample.get('__url__')} has no row in the embedding cache")
        for field in EMBEDDING_FIELDS:
            if field in want:
                vector = rows[field]
                if dims and field in dims and vector.shape[-1] != dims[field]:
                    raise SkipSample("bad_embedding", f"{key}: {field} has dim {vector.shape[-1]}, expected {dims[field]}")
                out[field] = torch.from_numpy(vector.astype(np.float32))
    return out


def collate(samples: list[dict]) -> dict:
    batch = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch

