"""One DataModule for every stage: webdataset caption-image shards and their chunked embedding cache.

A stage names the fields it needs (``img_emb txt_emb caption image image_lowres``):

* embeddings only (priors): cache shards are streamed, chunks shuffled in a small buffer with one
  vectorised permutation, and whole batches cut from them; no image shard is ever opened;
* images (+ embeddings): a source shard is opened together with its cache shard and rows are joined
  by sample key, so a skipped or reordered sample can never pair an image with another's embedding.

Shards are split over ranks, then over DataLoader workers, as webdataset's ``split_by_node`` /
``split_by_worker`` do (``islice(rank, None, world)``); rank and world come from the trainer, not from
environment variables, so the split is right under any launcher. Two epoch modes:

* ``exact``: every sample once per epoch (needs shards >= ranks x workers for an even split);
  validation, evaluation and tests;
* ``resampled``: each worker draws shards with replacement for a fixed number of batches, equal on
  every rank; training at scale.

The data order is a pure function of (seed, epoch, rank, worker); the DataModule's ``state_dict`` holds
(epoch, batches consumed), so a resumed run skips what it trained on and continues mid-epoch. Bad samples
are skipped, counted and reported with each batch under ``skipped`` (logged as ``data/skipped_*``); they
never stop a run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Iterator, Sequence

import braceexpand
import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from unclip.data import cache as cache_lib

log = logging.getLogger(__name__)

FIELDS = ("img_emb", "txt_emb", "caption", "image", "image_lowres", "meta")  # meta: the parsed KEY.json
EMBEDDING_FIELDS = ("img_emb", "txt_emb")
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


# ----------------------------------------------------------------------------------------- shards


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Expands shard specs to URLs: lists, brace patterns (``a-{000..009}.tar``), globs, directories
    (every ``*.tar`` inside) and remote/``pipe:`` URLs (passed through). Raises a named error when a
    local pattern matches nothing or a directory cannot be read."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        if item.startswith(REMOTE_PREFIXES):
            urls += list(braceexpand.braceexpand(item))
            continue
        path = Path(item)
        if path.is_dir():
            if not os.access(path, os.R_OK | os.X_OK):
                raise PermissionError(f"shard directory {path} is not readable; fix its permissions or point data at another directory")
            found = sorted(str(p) for p in path.glob("*.tar"))
            if not found:
                raise FileNotFoundError(f"shard directory {path} holds no *.tar files; generate data (python -m unclip.data.shapes out={path}) or fix the path")
            urls += found
            continue
        matched = []
        for expanded in braceexpand.braceexpand(item):
            matched += sorted(glob.glob(expanded)) if glob.has_magic(expanded) else ([expanded] if Path(expanded).exists() else [])
        if not matched:
            raise FileNotFoundError(f"shard pattern {item!r} matches no file; check the path, or create the data first")
        urls += matched
    return urls


def shard_name(url: str) -> str:
    """``.../train-00003.tar`` -> ``train-00003.tar``; a cache shard has its source shard's name."""
    return os.path.basename(url.split("?")[0].rstrip(" |").split()[-1])


def shard_sizes(urls: Sequence[str], cache_meta: dict | None = None) -> dict[str, int]:
    """Samples per shard, from the cache meta, a ``manifest.json`` or img2dataset's ``*_stats.json``
    beside the shards, else by listing the tar (local shards only)."""
    sizes: dict[str, int] = {}
    known = dict((cache_meta or {}).get("counts", {}))
    for url in urls:
        name = shard_name(url)
        if name in known:
            sizes[name] = int(known[name])
            continue
        if url.startswith(REMOTE_PREFIXES):
            continue
        folder = Path(url).parent
        manifest = folder / "manifest.json"
        stats = folder / (name[: -len(".tar")] + "_stats.json")
        if manifest.exists():
            known.update(json.loads(manifest.read_text()).get("counts", {}))
        if name in known:
            sizes[name] = int(known[name])
        elif stats.exists():
            sizes[name] = int(json.loads(stats.read_text()).get("successes", 0))
        else:
            sizes[name] = count_tar_samples(url)
    return sizes


def count_tar_samples(path: str) -> int:
    """Distinct sample keys in a tar, read from member headers only; a truncated tar counts what is readable."""
    keys = set()
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if member.isfile():
                    keys.add(member.name.split(".", 1)[0])
    except (tarfile.TarError, OSError) as exn:
        log.warning("shard %s is damaged (%s); counted %d readable samples", path, exn, len(keys))
    return len(keys)


def worker_slice(items: Sequence, rank: int, world: int) -> list:
    """The worker's share: by rank, then by DataLoader worker (webdataset's split_by_node/split_by_worker)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return list(islice(islice(items, rank, None, world), worker, None, workers))


def worker_seed(*parts) -> int:
    info = get_worker_info()
    return hash_seed(*parts, info.id if info else 0)


def hash_seed(*parts) -> int:
    """A seed that is a pure function of ``parts`` (Python's ``hash`` of a str changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


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


class _ShardStream(IterableDataset):
    """Shared epoch, rank and shard-order logic of the two datasets."""

    def __init__(self, urls: list[str], batch_size: int, mode: str, seed: int, shuffle: bool, drop_last: bool,
                 batches_per_epoch: int | None, sizes: dict[str, int]):
        if mode not in ("exact", "resampled"):
            raise ValueError(f"data epoch mode must be 'exact' or 'resampled', got {mode!r}")
        self.urls, self.batch_size, self.mode, self.seed = urls, batch_size, mode, seed
        self.shuffle, self.drop_last, self.sizes = shuffle, drop_last, sizes
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self.rank, self.world = 0, 0, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_rank(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    @property
    def rows_by_rank(self) -> bool:
        """Exact mode with fewer shards than ranks (a one-shard val set under DDP): every rank reads every
        shard and keeps rows ``i % world == rank`` of each, so no rank is left without data (an idle rank
        would wait forever for the others at the first collective)."""
        return self.mode == "exact" and self.world > 1 and len(self.urls) < self.world

    def keep_row(self, row_in_shard: int) -> bool:
        return not self.rows_by_rank or row_in_shard % self.world == self.rank

    def shard_order(self) -> Iterator[str]:
        """This worker's shards for this epoch: an even split (exact) or an endless seeded draw (resampled)."""
        if self.mode == "resampled":
            rng = random.Random(worker_seed(self.seed, self.epoch, self.rank, "resample"))
            while True:
                yield rng.choice(self.urls)
        urls = list(self.urls)
        if self.shuffle:
            random.Random(hash_seed(self.seed, self.epoch, "shards")).shuffle(urls)
        yield from worker_slice(urls, 0, 1) if self.rows_by_rank else worker_slice(urls, self.rank, self.world)

    def worker_batch_limit(self) -> int | None:
        if self.mode != "resampled":
            return None
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        total = self.batches_per_epoch or max(1, sum(self.sizes.values()) // (self.batch_size * self.world))
        return total // workers + (1 if worker < total % workers else 0)

    def __len__(self) -> int:
        """Batches per epoch on this rank (exact for resampled; an estimate for exact with uneven shards)."""
        if self.mode == "resampled":
            return self.batches_per_epoch or max(1, sum(self.sizes.values()) // (self.batch_size * self.world))
        if self.rows_by_rank:
            rows = sum(len(range(self.rank, self.sizes.get(shard_name(u), 0), self.world)) for u in self.urls)
        else:
            rows = sum(self.sizes.get(shard_name(u), 0) for u in islice(self.urls, self.rank, None, self.world))
        return max(1, rows // self.batch_size if self.drop_last else math.ceil(rows / self.batch_size))


# ------------------------------------------------------------------------------- embeddings only


class EmbeddingBatches(_ShardStream):
    """Whole batches cut from cache chunks: ``shuffle_chunks`` chunks are concatenated, permuted once,
    and cut; the remainder (< one batch) carries over. No per-row Python objects on the hot path."""

    def __init__(self, urls, fields, batch_size, dims=None, shuffle_chunks: int = 4, dtype=torch.float32, **kw):
        super().__init__(urls, batch_size, **kw)
        self.fields = tuple(f for f in fields if f in cache_lib.EMBEDDING_MEMBERS)
        self.want_text = "caption" in fields
        self.dims, self.shuffle_chunks, self.dtype = dims, max(1, shuffle_chunks), dtype

    def __iter__(self):
        skips = SkipCounter()
        rng = np.random.default_rng(worker_seed(self.seed, self.epoch, self.rank, "rows"))
        limit = self.worker_batch_limit()
        emitted = 0
        pool: list[cache_lib.Chunk] = []
        for url in self.shard_order():
            offset = 0  # rows of this shard read so far
            for chunk in cache_lib.iter_chunks(url, self.fields, skips.handler("bad_chunk"), self.dims):
                if self.rows_by_rank:
                    rows = [i for i in range(len(chunk)) if self.keep_row(offset + i)]
                    offset += len(chunk)
                    chunk = cache_lib.Chunk([chunk.keys[i] for i in rows], [chunk.captions[i] for i in rows],
                                            {f: a[rows] for f, a in chunk.arrays.items()})
                pool.append(chunk)
                if len(pool) < self.shuffle_chunks:
                    continue
                pool, batches = self._cut(pool, rng, final=False)
                for batch in batches:
                    batch["skipped"] = skips.take()
                    yield batch
                    emitted += 1
                    if limit is not None and emitted >= limit:
                        return
        if pool and self.mode == "exact":
            _, batches = self._cut(pool, rng, final=True)
            for batch in batches:
                batch["skipped"] = skips.take()
                yield batch

    def _cut(self, pool: list[cache_lib.Chunk], rng, final: bool):
        keys = [k for c in pool for k in c.keys]
        captions = [t for c in pool for t in c.captions]
        arrays = {f: torch.from_numpy(np.concatenate([c.arrays[f] for c in pool])) for f in self.fields}
        order = rng.permutation(len(keys)) if self.shuffle else np.arange(len(keys))
        size = self.batch_size
        full = len(keys) // size
        batches = [self._batch(order[i * size:(i + 1) * size], keys, captions, arrays) for i in range(full)]
        rest = order[full * size:]
        if final:
            if len(rest) and not self.drop_last:
                batches.append(self._batch(rest, keys, captions, arrays))
            return [], batches
        leftover = cache_lib.Chunk([keys[i] for i in rest], [captions[i] for i in rest],
                                   {f: a.numpy()[rest] for f, a in arrays.items()})
        return ([leftover] if len(rest) else []), batches

    def _batch(self, rows: np.ndarray, keys, captions, arrays: dict[str, torch.Tensor]) -> dict:
        index = torch.from_numpy(rows)
        # gather in fp16, then widen: half the bytes moved by the gather
        batch = {f: a.index_select(0, index).to(self.dtype) for f, a in arrays.items()}
        order = rows.tolist()
        batch["key"] = [keys[i] for i in order]
        if self.want_text:
            batch["caption"] = [captions[i] for i in order]
        return batch


# ------------------------------------------------------------------------------------ images


def decode_rgb(data: bytes, size: int | None) -> torch.Tensor:
    """PNG/JPEG bytes -> (3, size, size) float in [-1, 1] (centre crop to square, antialiased resize)."""
    import io

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


class SampleBatches(_ShardStream):
    """Per-sample decoding of source shards (images and captions), joined by key to cache rows."""

    def __init__(self, urls, fields, batch_size, image_size=None, lowres_size=None, cache_dir=None, dims=None,
                 shuffle_buffer: int = 256, on_missing_embedding: str = "skip", partitioned: bool = False, **kw):
        super().__init__(urls, batch_size, **kw)
        self.partitioned, self._partition_rows = partitioned, None
        self.want = set(fields) | {"caption"}
        self.image_size, self.lowres_size, self.cache_dir, self.dims = image_size, lowres_size, cache_dir, dims
        self.shuffle_buffer = shuffle_buffer if self.shuffle else 0
        self.on_missing_embedding = on_missing_embedding

    def _embeddings(self, url: str, skips: SkipCounter):
        """The cache rows this source shard joins to: its own cache shard, or the partition index."""
        fields = tuple(f for f in EMBEDDING_FIELDS if f in self.want)
        if not fields:
            return None
        if self.partitioned:
            if self._partition_rows is None:
                self._partition_rows = cache_lib.PartitionRows(self.cache_dir, fields, skips.handler("bad_chunk"))
            return self._partition_rows
        cache_url = os.path.join(self.cache_dir, shard_name(url))
        if not os.path.exists(cache_url):
            if self.on_missing_embedding == "error":
                raise FileNotFoundError(f"no cache shard {cache_url} for source shard {url}; run `python -m unclip.embed`")
            skips.skip("missing_cache_shard", f"{cache_url} (every sample of {url} skipped)")
            return cache_lib.ShardRows({"keys": []}, fields)
        return cache_lib.ShardRows(cache_lib.read_cache_shard(cache_url, fields, skips.handler("bad_chunk")), fields)

    def samples(self, skips: SkipCounter) -> Iterator[dict]:
        for url in self.shard_order():
            embeddings = self._embeddings(url, skips)
            if embeddings is not None and not len(embeddings):
                continue
            tar_samples = wds.tariterators.tarfile_samples([{"url": url}], handler=skips.handler("bad_tar_member"))
            for row, sample in enumerate(tar_samples):
                if not self.keep_row(row):
                    continue
                try:
                    yield decode_source_sample(sample, self.want, self.image_size, self.lowres_size, embeddings, self.dims)
                except SkipSample as skip:
                    if skip.reason == "missing_embedding" and self.on_missing_embedding == "error":
                        raise KeyError(str(skip)) from None
                    skips.skip(skip.reason, str(skip))

    def __iter__(self):
        skips = SkipCounter()
        rng = random.Random(worker_seed(self.seed, self.epoch, self.rank, "samples"))
        limit = self.worker_batch_limit()
        stream = self.samples(skips)
        if self.shuffle_buffer > 1:
            stream = shuffled(stream, self.shuffle_buffer, rng)
        emitted, pending = 0, []
        for sample in stream:
            pending.append(sample)
            if len(pending) == self.batch_size:
                batch = collate(pending)
                batch["skipped"] = skips.take()
                yield batch
                pending, emitted = [], emitted + 1
                if limit is not None and emitted >= limit:
                    return
        if pending and not self.drop_last and self.mode == "exact":
            batch = collate(pending)
            batch["skipped"] = skips.take()
            yield batch


def shuffled(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """A seeded shuffle buffer (webdataset's ``shuffle`` with an explicit generator)."""
    buffer = []
    for item in stream:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


# -------------------------------------------------------------------------------- DataModule


def as_is(batch: dict) -> dict:
    """Batches arrive whole; torch's default_convert would walk every key and caption string (40 % of the time)."""
    return batch


class ResumableLoader(DataLoader):
    """A DataLoader whose next iteration first drops ``skip`` batches: those a resumed run already trained
    on. The batches are produced and discarded (by the workers, in the order the uninterrupted run saw them),
    not decoded differently, so the batches that follow are exactly the ones it would have seen next."""

    skip = 0

    def __iter__(self):
        iterator = super().__iter__()
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            if next(iterator, None) is None:
                break
        return iterator


class CaptionImageDataModule(pl.LightningDataModule):
    """Caption-image shards and their embedding cache, for every stage.

    Args:
        train, val, val_unseen: shard specs (see :func:`resolve_shards`); ``val_unseen`` is optional.
        fields: what a batch holds, among ``img_emb txt_emb caption image image_lowres``.
        cache_dir: the embedding cache (needed when fields include embeddings).
        mode: ``exact`` or ``resampled`` for training (validation is always exact).
    """

    def __init__(self, train, val=None, val_unseen=None, fields=("image", "caption"), cache_dir: str | None = None,
                 batch_size: int = 64, val_batch_size: int | None = None, num_workers: int = 0, image_size: int | None = 64,
                 lowres_size: int | None = None, mode: str = "exact", batches_per_epoch: int | None = None, seed: int = 0,
                 shuffle: bool = True, shuffle_chunks: int = 4, shuffle_buffer: int = 256, embed_dim: int | None = None,
                 on_missing_embedding: str = "skip", pin_memory: bool = False, name: str = "data", **_ignored):
        super().__init__()
        unknown = set(fields) - set(FIELDS)
        if unknown:
            raise ValueError(f"unknown data fields {sorted(unknown)}; choose among {list(FIELDS)}")
        if "image_lowres" in fields and not lowres_size:
            raise ValueError("field image_lowres needs data.lowres_size")
        if on_missing_embedding not in ("skip", "error"):
            raise ValueError(f"data.on_missing_embedding must be 'skip' or 'error', got {on_missing_embedding!r}")
        self.specs = {"train": train, "val": val, "val_unseen": val_unseen}
        self.fields = tuple(fields)
        self.cache_dir = cache_dir
        self.batch_size, self.val_batch_size = batch_size, val_batch_size or batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.image_size, self.lowres_size = image_size, lowres_size
        self.mode, self.batches_per_epoch, self.seed, self.shuffle = mode, batches_per_epoch, seed, shuffle
        self.shuffle_chunks, self.shuffle_buffer = shuffle_chunks, shuffle_buffer
        self.embed_dim, self.on_missing_embedding = embed_dim, on_missing_embedding
        self.datasets: dict[str, _ShardStream] = {}
        self.cache_meta: dict | None = None
        self.epoch = 0
        self.resume_batches = 0  # train batches of self.epoch to skip on the next iteration (set by load_state_dict)

    @property
    def embeddings_only(self) -> bool:
        return not set(self.fields) & {"image", "image_lowres"}

    @property
    def needs_cache(self) -> bool:
        return bool(set(self.fields) & set(EMBEDDING_FIELDS))

    def splits(self) -> list[str]:
        return [s for s in ("train", "val", "val_unseen") if self.specs.get(s)]

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.needs_cache:
            if not self.cache_dir:
                raise ValueError(f"fields {list(self.fields)} need embeddings but data.cache_dir is not set")
            self.cache_meta = cache_lib.read_meta(self.cache_dir)
            if self.embed_dim and self.cache_meta.get("dim") != self.embed_dim:
                raise ValueError(f"embedding dim {self.cache_meta.get('dim')} in cache {self.cache_dir} does not match "
                                 f"clip.embed_dim {self.embed_dim}; rerun `python -m unclip.embed` or set clip=...")
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        for split in self.splits():
            dataset = self.build(split)
            dataset.set_rank(rank, world)
            dataset.set_epoch(self.epoch)
            self.datasets[split] = dataset

    def source_urls(self, split: str) -> list[str]:
        return resolve_shards(self.specs[split])

    def build(self, split: str) -> _ShardStream:
        urls = self.source_urls(split)
        training = split == "train"
        dims = {f: self.cache_meta["dim"] for f in EMBEDDING_FIELDS} if self.cache_meta else None
        common = dict(mode=self.mode if training else "exact", seed=self.seed, shuffle=self.shuffle and training,
                      drop_last=training, batches_per_epoch=self.batches_per_epoch if training else None)
        batch_size = self.batch_size if training else self.val_batch_size
        partitioned = bool(self.cache_meta) and self.cache_meta.get("layout") == "partitions"
        if self.embeddings_only and self.needs_cache:
            if partitioned:  # clip-retrieval partitions: the cache's own shards of this split, not the source's names
                names = [n for n, s in sorted(self.cache_meta["splits"].items()) if s == split]
                if not names:
                    raise FileNotFoundError(f"partition cache {self.cache_dir} has no {split} partitions")
            else:
                names = [shard_name(u) for u in urls]
            cache_urls = [os.path.join(self.cache_dir, n) for n in names]
            missing = [u for u in cache_urls if not os.path.exists(u)]
            if missing:
                raise FileNotFoundError(f"embedding cache {self.cache_dir} lacks {len(missing)} shard(s), e.g. {missing[0]}; "
                                        f"run `python -m unclip.embed` to (re)build it")
            sizes = shard_sizes(cache_urls, self.cache_meta)
            return EmbeddingBatches(cache_urls, self.fields, batch_size, dims=dims, shuffle_chunks=self.shuffle_chunks,
                                    sizes=sizes, **common)
        self.check_source_fields(urls[0])
        return SampleBatches(urls, self.fields, batch_size, image_size=self.image_size, lowres_size=self.lowres_size,
                             cache_dir=self.cache_dir, dims=dims, shuffle_buffer=self.shuffle_buffer,
                             on_missing_embedding=self.on_missing_embedding, partitioned=partitioned,
                             sizes=shard_sizes(urls, None if partitioned else self.cache_meta), **common)

    def check_source_fields(self, url: str) -> None:
        """Fails at setup, naming the member, when the first sample of a shard lacks what the stage needs."""
        if url.startswith(REMOTE_PREFIXES):
            return
        for sample in wds.tariterators.tarfile_samples([{"url": url}], handler=wds.warn_and_continue):
            if not set(self.fields) & {"image", "image_lowres"}:
                required = {"txt": "a caption (.txt)"}
            else:
                required = {"txt": "a caption (.txt)", "image": "an image (.png/.jpg/.webp)"}
            present = set(sample) | ({"image"} if image_member(sample) else set())
            lacking = [what for member, what in required.items() if member not in present]
            if lacking:
                raise ValueError(f"shard {url} lacks {', '.join(lacking)} (first sample {sample['__key__']} has "
                                 f"{sorted(k for k in sample if not k.startswith('__'))}), but fields {list(self.fields)} need it")
            return

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for dataset in self.datasets.values():
            dataset.set_epoch(epoch)

    def loader(self, split: str) -> DataLoader:
        self.setup()
        dataset = self.datasets[split]
        return ResumableLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                               persistent_workers=False, collate_fn=as_is)

    def train_dataloader(self) -> DataLoader:
        loader = self.loader("train")
        loader.skip, self.resume_batches = self.resume_batches, 0
        return loader

    def val_dataloader(self):
        loaders = [self.loader(s) for s in ("val", "val_unseen") if self.specs.get(s)]
        return loaders[0] if len(loaders) == 1 else loaders

    def state_dict(self) -> dict:
        """The data position: the epoch, the train batches of it this rank has trained on (every rank steps
        together, so the count is the same on all), and whether the epoch was over. With the order a pure
        function of (seed, epoch), that is all a resumed run needs to continue with the next batch."""
        batches, epoch_done = 0, False
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.state.fn == "fit":
            progress = trainer.fit_loop.epoch_loop.batch_progress
            batches, epoch_done = int(progress.current.processed), bool(progress.is_last_batch)
        return {"epoch": self.epoch, "batches": batches, "epoch_done": epoch_done}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state.get("epoch", 0)), int(state.get("batches", 0))
        if state.get("epoch_done"):  # Lightning resumes such a checkpoint at the start of the next epoch
            epoch, batches = epoch + 1, 0
        self.set_epoch(epoch)
        self.resume_batches = batches
