import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds

from unclip.data import cache as cache_lib
from unclip.data import decoding as decoding_lib
from unclip.data.cache import write_cache_shard, write_meta
from unclip.data.datamodule import CaptionImageDataModule
from unclip.data.shards import resolve_shards


def all_keys(shapes_dir, split="train"):
    keys = []
    for path in sorted(shapes_dir.glob(f"{split}-*.tar")):
        keys += [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]
    return keys


def test_image_batches_round_trip(shapes_dir):
    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["image", "caption", "meta"], batch_size=10,
                                image_size=32, shuffle=False)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.datasets["train"]) == 96 // 10  # training drops the last partial batch
    batch = batches[0]
    assert batch["image"].shape == (10, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert len(batch["caption"]) == len(batch["key"]) == 10 and batch["meta"][0]["objects"]
    assert batch["key"][:10] == all_keys(shapes_dir)[:10]


def test_lowres_field_is_a_downsample(shapes_dir):
    dm = CaptionImageDataModule(train=str(shapes_dir), val=None, fields=["image", "image_lowres"], batch_size=4,
                                image_size=64, lowres_size=16, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["image_lowres"].shape == (4, 3, 16, 16)
    pooled = torch.nn.functional.avg_pool2d(batch["image"], 4)
    assert (pooled - batch["image_lowres"]).abs().mean() < 0.1


@pytest.mark.parametrize("fields", [["image", "caption"], ["img_emb", "txt_emb", "caption"]])
def test_each_sample_exactly_once_over_two_ranks_and_two_workers(shapes_dir, cache_dir, fields):
    seen = Counter()
    for rank in range(2):
        dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=fields, cache_dir=cache_dir, batch_size=5,
                                    num_workers=2, image_size=16, seed=3)
        dm.setup()
        dataset = dm.datasets["train"]
        dataset.set_rank(rank, 2)
        dataset.drop_last = False  # count every sample, as validation does
        for batch in torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2):
            seen.update(batch["key"])
    assert set(seen) == set(all_keys(shapes_dir)) and set(seen.values()) == {1}


def test_embeddings_only_path_never_decodes_an_image(shapes_dir, cache_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("an image was decoded on the embeddings-only path")

    monkeypatch.setattr(decoding_lib, "decode_rgb", forbidden)
    monkeypatch.setattr(decoding_lib.Image, "open", forbidden)
    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["img_emb", "txt_emb", "caption"],
                                cache_dir=cache_dir, batch_size=16, embed_dim=128)
    dm.setup()
    opened = []
    original = cache_lib.tar_samples
    monkeypatch.setattr(cache_lib, "tar_samples", lambda url, handler: (opened.append(url), original(url, handler))[1])
    batches = list(dm.train_dataloader())
    assert batches and batches[0]["img_emb"].shape == (16, 128) and batches[0]["txt_emb"].dtype == torch.float32
    assert opened and all(url.startswith(str(cache_dir)) for url in opened)
    assert sum(len(b["key"]) for b in batches) == 96


def test_data_order_is_a_function_of_seed_and_epoch(shapes_dir, cache_dir):
    def order(epoch, seed=0):
        dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["img_emb"], cache_dir=cache_dir,
                                    batch_size=8, seed=seed)
        dm.setup()
        dm.set_epoch(epoch)
        return [k for b in dm.train_dataloader() for k in b["key"]]

    assert order(0) == order(0)
    assert order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    assert order(0, seed=1) != order(0)


def test_resampled_mode_has_a_fixed_length(shapes_dir, cache_dir):
    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["img_emb"], cache_dir=cache_dir,
                                batch_size=8, mode="resampled", batches_per_epoch=30, num_workers=2)
    dm.setup()
    assert len(dm.train_dataloader()) == 30
    assert len(list(dm.train_dataloader())) == 30


def corrupt_shard(shapes_dir, tmp_path):
    """A copy of train-00000 with a corrupt image, an empty caption, a missing caption and a truncated end."""
    src = list(wds.WebDataset(str(shapes_dir / "train-00000.tar"), shardshuffle=False))
    out = tmp_path / "bad-00000.tar"
    with wds.TarWriter(str(out)) as sink:
        for i, sample in enumerate(src):
            sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
            if i == 1:
                sample["png"] = b"not a png at all"
            if i == 2:
                sample["txt"] = b"   "
            if i == 3:
                del sample["txt"]
            sink.write(sample)
    data = out.read_bytes()
    out.write_bytes(data[: len(data) - 3000])  # truncate the last member(s)
    return out, [s["__key__"] for s in src]


def test_corrupt_members_are_skipped_and_counted(shapes_dir, tmp_path):
    path, keys = corrupt_shard(shapes_dir, tmp_path)
    dm = CaptionImageDataModule(train=str(path), fields=["image", "caption"], batch_size=4, image_size=16, shuffle=False)
    dm.setup()
    dataset = dm.datasets["train"]
    dataset.drop_last = False
    batches = list(dm.train_dataloader())
    got = [k for b in batches for k in b["key"]]
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    assert skipped["corrupt_image"] == 1 and skipped["empty_caption"] == 1 and skipped["missing_caption"] == 1
    assert keys[1] not in got and keys[2] not in got and keys[3] not in got
    assert got == [k for k in keys if k in got] and len(got) >= len(keys) - 5  # every good sample before the cut


def test_bad_paths_and_missing_fields_are_named(tmp_path, shapes_dir, cache_dir):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no"):
        resolve_shards(str(tmp_path / "empty"))
    assert resolve_shards(f"{shapes_dir}/train-{{00000..00001}}.tar")[1].endswith("train-00001.tar")
    with pytest.raises(ValueError, match="unknown data fields"):
        CaptionImageDataModule(train=str(shapes_dir), fields=["pixels"])
    textless = tmp_path / "textless-00000.tar"
    with wds.TarWriter(str(textless)) as sink:
        sink.write({"__key__": "a", "png": (shapes_dir / "manifest.json").read_bytes()})
    with pytest.raises(ValueError, match=r"lacks a caption \(.txt\)"):
        CaptionImageDataModule(train=str(textless), fields=["image", "caption"]).setup()
    with pytest.raises(FileNotFoundError, match="no embedding cache"):
        CaptionImageDataModule(train=str(shapes_dir), fields=["img_emb"], cache_dir=str(tmp_path / "nocache")).setup()
    with pytest.raises(ValueError, match="does not match clip.embed_dim 512"):
        CaptionImageDataModule(train=str(shapes_dir), fields=["img_emb"], cache_dir=cache_dir, embed_dim=512).setup()


def test_key_join_pairs_each_image_with_its_own_embedding(shapes_dir, tmp_path):
    """A cache whose rows are in another order and lack some keys: every image still meets its own row."""
    path, keys = corrupt_shard(shapes_dir, tmp_path)
    rng = np.random.default_rng(0)
    cached = [k for k in keys if k != keys[5]]  # one key has no embedding
    rng.shuffle(cached)
    marker = {k: float(i) for i, k in enumerate(keys)}  # the embedding encodes which key it belongs to
    rows = np.array([[marker[k]] * 4 for k in cached], np.float32)
    cache = tmp_path / "cache"
    cache.mkdir()
    write_cache_shard(cache / path.name, {"img_emb": rows, "txt_emb": rows}, cached, ["c"] * len(cached), chunk_size=7)
    write_meta(cache, {"dim": 4, "counts": {path.name: len(cached)}, "clip": {}})
    dm = CaptionImageDataModule(train=str(path), fields=["image", "img_emb", "txt_emb"], cache_dir=str(cache),
                                batch_size=3, image_size=8, shuffle=False)
    dm.setup()
    dm.datasets["train"].drop_last = False
    batches = list(dm.train_dataloader())
    for batch in batches:
        for key, emb in zip(batch["key"], batch["img_emb"]):
            assert emb[0].item() == marker[key]
    assert sum(b["skipped"].get("missing_embedding", 0) for b in batches) == 1


def test_embedding_of_wrong_size_is_skipped(shapes_dir, tmp_path):
    path = shapes_dir / "train-00000.tar"
    keys = all_keys(shapes_dir)[:24]
    cache = tmp_path / "cache"
    cache.mkdir()
    write_cache_shard(cache / path.name, {"img_emb": np.zeros((24, 6)), "txt_emb": np.zeros((24, 6))}, keys, ["c"] * 24, 8)
    write_meta(cache, {"dim": 4, "counts": {path.name: 24}, "clip": {}})
    dm = CaptionImageDataModule(train=str(path), fields=["image", "img_emb"], cache_dir=str(cache), batch_size=4, image_size=8)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert not batches or all(len(b["key"]) == 0 for b in batches)
    dm2 = CaptionImageDataModule(train=str(path), fields=["img_emb"], cache_dir=str(cache), batch_size=4)
    dm2.setup()
    assert list(dm2.train_dataloader()) == []  # every chunk has the wrong dim: skipped, not crashed


def damaged_shards(shapes_dir, tmp_path):
    """The four train shards with 4 corrupt samples each (2 unreadable images, 2 blank captions, just before
    each shard's last sample, after its last full batch) and the last shard truncated in its last sample."""
    out = tmp_path / "damaged"
    out.mkdir()
    good = []
    for j, shard in enumerate(sorted(shapes_dir.glob("train-*.tar"))):
        samples = list(wds.WebDataset(str(shard), shardshuffle=False))
        path = out / shard.name
        with wds.TarWriter(str(path)) as sink:
            for i, sample in enumerate(samples):
                sample = {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
                if i in (len(samples) - 2, len(samples) - 4):
                    sample["png"] = b"not a png"
                elif i in (len(samples) - 3, len(samples) - 5):
                    sample["txt"] = b"  "
                else:
                    good.append(sample["__key__"])
                sink.write(sample)
        if j == 3:
            with tarfile.open(path) as tar:
                last = tar.getmembers()[-1]
            data = path.read_bytes()
            path.write_bytes(data[: last.offset_data + last.size // 2])  # halfway through the last member
    return out, good


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_counts_are_exact_with_workers_and_a_truncated_tar_counts_once(shapes_dir, tmp_path, workers):
    folder, good = damaged_shards(shapes_dir, tmp_path)
    dm = CaptionImageDataModule(train=str(folder / "train-*.tar"), fields=["image", "caption"], batch_size=4,
                                image_size=16, shuffle=False, num_workers=workers)
    dm.setup()
    batches = list(dm.train_dataloader())  # training: drop_last, so skips after a worker's last batch...
    skipped = Counter()
    for b in batches:
        skipped.update(b["skipped"])
    # ...still reach the trainer, and the sample the truncation cut short is not counted a second time
    # under the member it lost (no missing_caption / missing_image beside bad_tar_member)
    cut = set(good) - {k for b in batches for k in b["key"]}
    assert dict(skipped) == {"corrupt_image": 8, "empty_caption": 8, "bad_tar_member": 1}
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) and set(keys) <= set(good) and cut  # each sample at most once; a tail dropped


def test_embed_counts_a_truncated_tar_once_and_logs_the_rows_it_wrote(shapes_dir, embed_cfg, tmp_path, caplog):
    from omegaconf import OmegaConf

    from unclip.embed import embed

    folder, good = damaged_shards(shapes_dir, tmp_path)
    cfg = OmegaConf.merge(embed_cfg, {"data": {"train": str(folder / "train-*.tar"), "cache_dir": str(tmp_path / "cache")},
                                      "splits": ["train"]})
    with caplog.at_level("INFO", logger="unclip.embed"):
        meta = embed(cfg)
    assert meta["skipped"]["train-00003.tar"] == {"corrupt_image": 2, "empty_caption": 2, "bad_tar_member": 1}
    assert meta["skipped_total"] == 17 and meta["embedded"] == len(good) - 1  # the truncation took one good sample
    assert f"embedded {meta['embedded']} samples" in caplog.text  # the rows written, not the shards' listed sizes
