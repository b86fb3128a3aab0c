"""One DataModule for every stage: webdataset caption-image shards and their chunked embedding cache.

A stage names the fields it needs (``img_emb txt_emb txt_tok caption image image_lowres``; ``txt_tok``, the
caption's token states, is served when the cache holds them and dropped otherwise):

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

import logging
import os

import lightning.pytorch as pl
import webdataset as wds
from torch.utils.data import DataLoader

from unclip.data import cache as cache_lib
from unclip.data.decoding import EMBEDDING_FIELDS, image_member
from unclip.data.shards import REMOTE_PREFIXES, resolve_shards, shard_name, shard_sizes
from unclip.data.streams import EmbeddingBatches, SampleBatches, ShardStream

log = logging.getLogger(__name__)

FIELDS = ("img_emb", "txt_emb", "txt_tok", "caption", "image", "image_lowres", "meta")  # meta: the parsed KEY.json


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
        self.datasets: dict[str, ShardStream] = {}
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
                                 f"clip.embed_dim {self.embed_dim}; rerun `python embed.py` or set clip=...")
            if "txt_tok" in self.fields and not self.cache_meta.get("token_states"):
                # optional: the module computes the token states from the captions with the frozen text tower
                log.info("embedding cache %s holds no caption token states (python embed.py token_states=true caches "
                         "them); they are computed on the fly", self.cache_dir)
                self.fields = tuple(f for f in self.fields if f != "txt_tok")
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        for split in self.splits():
            dataset = self.build(split)
            dataset.set_rank(rank, world)
            dataset.set_epoch(self.epoch)
            self.datasets[split] = dataset

    def source_urls(self, split: str) -> list[str]:
        return resolve_shards(self.specs[split])

    def build(self, split: str) -> ShardStream:
        urls = self.source_urls(split)
        training = split == "train"
        dims = self.row_widths()
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
                                        f"run `python embed.py` to (re)build it")
            sizes = shard_sizes(cache_urls, self.cache_meta)
            return EmbeddingBatches(cache_urls, self.fields, batch_size, dims=dims, shuffle_chunks=self.shuffle_chunks,
                                    sizes=sizes, **common)
        self.check_source_fields(urls[0])
        return SampleBatches(urls, self.fields, batch_size, image_size=self.image_size, lowres_size=self.lowres_size,
                             cache_dir=self.cache_dir, dims=dims, shuffle_buffer=self.shuffle_buffer,
                             on_missing_embedding=self.on_missing_embedding, partitioned=partitioned,
                             sizes=shard_sizes(urls, None if partitioned else self.cache_meta), **common)

    def row_widths(self) -> dict[str, int] | None:
        """The last dimension each cached field must have: the embedding dim, the text tower's width for token states."""
        if not self.cache_meta:
            return None
        widths = {"img_emb": self.cache_meta["dim"], "txt_emb": self.cache_meta["dim"]}
        if self.cache_meta.get("token_width"):
            widths["txt_tok"] = int(self.cache_meta["token_width"])
        return widths

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
