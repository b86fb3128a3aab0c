"""The two iterable datasets behind the DataModule, and how they split shards over ranks and workers.

* :class:`EmbeddingBatches` (priors): cache shards only; chunks are shuffled in a small buffer with one
  vectorised permutation and whole batches are cut from them; no image shard is ever opened.
* :class:`SampleBatches` (CLIP, decoder, upsampler): a source shard is opened together with its cache
  shard and rows are joined by sample key.

Shards are split over ranks, then over DataLoader workers, as webdataset's ``split_by_node`` /
``split_by_worker`` do (``islice(rank, None, world)``). ``exact`` mode reads every sample once per
epoch; ``resampled`` draws shards with replacement for a fixed number of batches on every rank.
"""

from __future__ import annotations

import math
import os
import random
from itertools import islice
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from unclip.data import cache as cache_lib
from unclip.data.decoding import EMBEDDING_FIELDS, SkipCounter, SkipSample, collate, decode_source_sample, tar_samples
from unclip.data.shards import shard_name
from unclip.seeding import hash_seed, worker_seed


def with_final_skips(batches: Iterator[dict], skips: SkipCounter) -> Iterator[dict]:
    """Yields each batch one step late, so that what is skipped after a worker's last batch (trailing bad
    samples, a truncated tar's tail, rows that no batch takes) still reaches the trainer, counted in that
    last batch's ``skipped``: otherwise a worker's final skips vanish with it."""
    held = None
    for batch in batches:
        if held is not None:
            yield held
        held = batch
    if held is not None:
        for reason, count in skips.take().items():
            held["skipped"][reason] = held["skipped"].get(reason, 0) + count
        yield held


def worker_slice(items: Sequence, rank: int, world: int) -> list:
    """The worker's share: by rank, then by DataLoader worker (webdataset's split_by_node/split_by_worker)."""
    info = get_worker_info()
    worker, workers = (info.id, info.num_workers) if info else (0, 1)
    return list(islice(islice(items, rank, None, world), worker, None, workers))



class ShardStream(IterableDataset):
    """Shared epoch, rank and shard-order logic of the two datasets."""

    def __init__(self, urls: list[str], batch_size: int, mode: str, seed: int, shuffle: bool, drop_last: bool,
                 batches_per_epoch: int | None, sizes: dict[str, int]):
        if mode not in ("exact", "resampled"):
            raise ValueError(f"data epoch mode must be 'exact' or 'resampled', got {mode!r}")
        self.urls, self.batch_size, self.mode, self.seed = urls, batch_size, mode, seed
        self.shuffle, self.drop_last, self.sizes = shuffle, drop_last, sizes
        self.batches_per_epoch = batches_per_epoch
        self.epoch, self.rank, self.world = 0, 0, 1

    def batches(self, skips: SkipCounter) -> Iterator[dict]:
        """This worker's batches for the epoch, each with the skips counted since the previous one."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        skips = SkipCounter()
        return with_final_skips(self.batches(skips), skips)

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


class EmbeddingBatches(ShardStream):
    """Whole batches cut from cache chunks: ``shuffle_chunks`` chunks are concatenated, permuted once,
    and cut; the remainder (< one batch) carries over. No per-row Python objects on the hot path."""

    def __init__(self, urls, fields, batch_size, dims=None, shuffle_chunks: int = 4, dtype=torch.float32, **kw):
        super().__init__(urls, batch_size, **kw)
        self.fields = tuple(f for f in fields if f in cache_lib.EMBEDDING_MEMBERS)
        self.want_text = "caption" in fields
        self.dims, self.shuffle_chunks, self.dtype = dims, max(1, shuffle_chunks), dtype

    def batches(self, skips: SkipCounter) -> Iterator[dict]:
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


class SampleBatches(ShardStream):
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
                raise FileNotFoundError(f"no cache shard {cache_url} for source shard {url}; run `python embed.py`")
            skips.skip("missing_cache_shard", f"{cache_url} (every sample of {url} skipped)")
            return cache_lib.ShardRows({"keys": []}, fields)
        return cache_lib.ShardRows(cache_lib.read_cache_shard(cache_url, fields, skips.handler("bad_chunk")), fields)

    def samples(self, skips: SkipCounter) -> Iterator[dict]:
        for url in self.shard_order():
            embeddings = self._embeddings(url, skips)
            if embeddings is not None and not len(embeddings):
                continue
            for row, (sample, cut_short) in enumerate(tar_samples(url, skips)):
                if not self.keep_row(row):
                    continue
                try:
                    yield decode_source_sample(sample, self.want, self.image_size, self.lowres_size, embeddings, self.dims)
                except SkipSample as skip:
                    if skip.reason == "missing_embedding" and self.on_missing_embedding == "error":
                        raise KeyError(str(skip)) from None
                    if not cut_short:  # a sample the tar's read error cut short is counted with that error
                        skips.skip(skip.reason, str(skip))

    def batches(self, skips: SkipCounter) -> Iterator[dict]:
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


