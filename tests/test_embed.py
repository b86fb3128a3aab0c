import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from unclip.data.cache import load_stats, read_cache_shard, read_meta
from unclip.embed import embed


def test_cache_layout_and_rows_match_direct_encoding(cache_dir, shapes_dir, tiny_clip):
    cache = Path(cache_dir)
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(p.name for p in shapes_dir.glob("*.tar"))
    meta = read_meta(cache)
    assert meta["dim"] == 128 and meta["embedded"] == 96 + 24 + 24 and meta["clip"]["model"] == "unclip-tiny"
    # chunk_size=10: a 24-row shard has chunks of 10, 10, 4 rows
    members = [s for s in wds.WebDataset(str(cache / "train-00000.tar"), shardshuffle=False)]
    assert [len(json.loads(m["keys.json"])) for m in members] == [10, 10, 4]
    table = read_cache_shard(str(cache / "train-00000.tar"), ("img_emb", "txt_emb"))
    assert table["img_emb"].dtype == np.float16 and table["img_emb"].shape == (24, 128)
    source = list(wds.WebDataset(str(shapes_dir / "train-00000.tar"), shardshuffle=False).decode("pil"))
    assert table["keys"] == [s["__key__"] for s in source]
    z_img = tiny_clip.encode_image([s["png"] for s in source[:4]])
    z_txt = tiny_clip.encode_text([s["txt"] for s in source[:4]]).z_txt
    assert np.allclose(table["img_emb"][:4], z_img.numpy(), atol=2e-3)
    assert np.allclose(table["txt_emb"][:4], z_txt.numpy(), atol=2e-3)
    assert table["captions"][:4] == [s["txt"] for s in source[:4]]


def test_stats_are_fit_on_train_only(cache_dir):
    stats = load_stats(cache_dir)
    train = np.concatenate([read_cache_shard(str(p), ("img_emb",))["img_emb"] for p in sorted(Path(cache_dir).glob("train-*.tar"))])
    assert np.allclose(stats["img_mean"], train.astype(np.float64).mean(0), atol=1e-4)
    assert stats["pca_components"].shape[1] == 128
    assert np.isclose(stats["pca_explained_ratio"].sum(), 1.0, atol=1e-4)
    assert np.all(np.diff(stats["pca_explained_variance"]) <= 1e-7)


def test_embed_resumes_after_an_interrupted_shard(embed_cfg, cache_dir, tmp_path):
    cache = Path(cache_dir)
    victim = cache / "train-00002.tar"
    before = read_cache_shard(str(victim), ("img_emb",))
    meta = read_meta(cache)
    # a kill -9 mid-shard leaves a .tmp file and no meta entry; the finished shards must stay untouched
    victim.rename(cache / "train-00002.tar.tmp")
    del meta["counts"]["train-00002.tar"]
    (cache / "meta.json").write_text(json.dumps(meta))
    untouched = (cache / "train-00001.tar").stat().st_mtime_ns
    embed(embed_cfg)
    after = read_cache_shard(str(victim), ("img_emb",))
    assert after["keys"] == before["keys"] and np.array_equal(after["img_emb"], before["img_emb"])
    assert (cache / "train-00001.tar").stat().st_mtime_ns == untouched
    assert read_meta(cache)["embedded"] == 96 + 24 + 24


def test_cache_of_another_clip_is_refused(embed_cfg, cache_dir):
    from omegaconf import OmegaConf

    other = OmegaConf.merge(embed_cfg, {"clip": {"model_name": "ViT-B-32", "embed_dim": 512}})
    with pytest.raises(ValueError, match="was made with CLIP unclip-tiny.*this run uses ViT-B-32"):
        embed(other)


def test_clip_retrieval_partitions_ingest_and_join_by_key(cache_dir, shapes_dir, tmp_path):
    """Partitions whose rows cut across source shards, in another order: the join still goes by key."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from unclip.data.clip_retrieval import ingest
    from unclip.data.datamodule import CaptionImageDataModule

    train = [read_cache_shard(str(p), ("img_emb", "txt_emb")) for p in sorted(Path(cache_dir).glob("train-*.tar"))]
    keys = [k for t in train for k in t["keys"]]
    captions = [c for t in train for c in t["captions"]]
    img, txt = np.concatenate([t["img_emb"] for t in train]), np.concatenate([t["txt_emb"] for t in train])
    order = np.random.default_rng(0).permutation(len(keys))
    src = tmp_path / "clip_retrieval"
    for sub in ("img_emb", "text_emb", "metadata"):
        (src / sub).mkdir(parents=True)
    for part, rows in enumerate(np.array_split(order, 2)):
        np.save(src / "img_emb" / f"img_emb_{part}.npy", img[rows])
        np.save(src / "text_emb" / f"text_emb_{part}.npy", txt[rows])
        pq.write_table(pa.table({"key": [keys[i] for i in rows], "caption": [captions[i] for i in rows]}),
                       src / "metadata" / f"metadata_{part}.parquet")
    out = tmp_path / "ingested"
    meta = ingest(src, out, model="unclip-tiny", chunk_size=16)
    assert meta["embedded"] == 96 and sorted(meta["counts"]) == ["part-00000.tar", "part-00001.tar"]
    part0 = read_cache_shard(str(out / "part-00000.tar"), ("img_emb",))
    assert part0["keys"] == [keys[i] for i in np.array_split(order, 2)[0]]
    assert np.array_equal(part0["img_emb"], img[np.array_split(order, 2)[0]])

    truth = dict(zip(keys, img))
    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["image", "img_emb"], cache_dir=str(out),
                                batch_size=8, image_size=8, shuffle=False)
    dm.setup()
    seen = 0
    for batch in dm.train_dataloader():
        for key, emb in zip(batch["key"], batch["img_emb"]):
            assert np.array_equal(emb.numpy(), truth[key].astype(np.float32))
            seen += 1
    assert seen == 96
    priors = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["img_emb", "txt_emb"], cache_dir=str(out),
                                    batch_size=8)
    priors.setup()
    assert sorted(k for b in priors.train_dataloader() for k in b["key"]) == sorted(keys)


def test_memory_mapped_and_streamed_cache_reads_agree(tmp_path):
    from unclip.data.cache import iter_chunks, load_npy, mapped_tar_samples, npy_bytes, write_cache_shard

    rng = np.random.default_rng(0)
    rows = {"img_emb": rng.standard_normal((10, 6)), "txt_emb": rng.standard_normal((10, 6))}
    keys = [f"k{i}" for i in range(10)]
    shard = tmp_path / "s.tar"
    write_cache_shard(shard, rows, keys, [f"caption {i}" for i in range(10)], chunk_size=4)
    fields = ("img_emb", "txt_emb")
    mapped = list(iter_chunks(str(shard), fields, wds.reraise_exception))
    streamed = list(iter_chunks(f"pipe:cat {shard}", fields, wds.reraise_exception))
    assert [len(c) for c in mapped] == [4, 4, 2] and [c.keys for c in mapped] == [c.keys for c in streamed]
    for a, b in zip(mapped, streamed):
        assert a.captions == b.captions
        for field in fields:
            assert np.array_equal(a.arrays[field], b.arrays[field]) and a.arrays[field].dtype == np.float16
    assert isinstance(mapped_tar_samples(str(shard))[0]["img_emb.npy"], memoryview)  # read in place, not copied
    fortran = np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32))
    assert np.array_equal(load_npy(memoryview(npy_bytes(fortran))), fortran)


def test_a_truncated_cache_shard_is_reported_not_silently_shortened(tmp_path):
    from unclip.data.cache import iter_chunks, write_cache_shard

    shard = tmp_path / "s.tar"
    write_cache_shard(shard, {"img_emb": np.ones((8, 4))}, [f"k{i}" for i in range(8)], [""] * 8, chunk_size=4)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # cut inside the second chunk
    with pytest.raises(Exception):
        list(iter_chunks(str(shard), ("img_emb",), wds.reraise_exception))
    skipped = []
    chunks = list(iter_chunks(str(shard), ("img_emb",), lambda exn: skipped.append(exn) or True))
    assert skipped and sum(len(c) for c in chunks) < 8


class Killed(BaseException):
    """The process dying mid-write (no exception handler runs for a real kill -9; none may rescue this one)."""


def test_stats_cut_short_by_a_kill_are_rewritten_by_the_rerun(embed_cfg, cache_dir, tmp_path, monkeypatch):
    import io
    import shutil

    from omegaconf import OmegaConf

    cache = tmp_path / "cache"
    shutil.copytree(cache_dir, cache)
    expected = load_stats(cache)
    (cache / "stats.npz").unlink()  # every shard embedded, the stats still to write
    cfg = OmegaConf.merge(embed_cfg, {"data": {"cache_dir": str(cache)}})
    savez = np.savez

    def killed_halfway(file, **arrays):
        buffer = io.BytesIO()
        savez(buffer, **arrays)
        data = buffer.getvalue()
        if isinstance(file, (str, os.PathLike)):
            Path(file).write_bytes(data[: len(data) // 2])
        else:
            file.write(data[: len(data) // 2])
        raise Killed

    monkeypatch.setattr(np, "savez", killed_halfway)
    with pytest.raises(Killed):
        embed(cfg)
    monkeypatch.setattr(np, "savez", savez)
    embed(cfg)  # the same command again
    stats = load_stats(cache)
    assert sorted(stats) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(stats[name], value, err_msg=name)


def test_cached_token_states_reach_batches_and_condition_the_decoder_as_the_text_tower_does(embed_cfg, cache_dir, tiny_clip,
                                                                                           shapes_dir, tmp_path):
    from omegaconf import OmegaConf

    from unclip.data.datamodule import CaptionImageDataModule
    from unclip.modules.decoder import DecoderModule
    from test_decoder import DIFFUSION, SAMPLER, tiny_unet_config

    cached = tmp_path / "with_tokens"
    meta = embed(OmegaConf.merge(embed_cfg, {"token_states": True, "data": {"cache_dir": str(cached)}}))
    assert meta["token_states"] and meta["token_width"] == tiny_clip.text_width

    decoder_fields = ["image", "img_emb", "txt_tok", "caption"]
    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=decoder_fields, cache_dir=str(cached),
                                batch_size=8, image_size=16, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    text = tiny_clip.encode_text(batch["caption"])
    assert batch["txt_tok"].shape == (8, 32, tiny_clip.text_width)
    assert torch.allclose(batch["txt_tok"], text.tokens * text.mask[..., None], atol=1e-2)  # fp16 in the cache

    module = DecoderModule(tiny_unet_config(), DIFFUSION, SAMPLER, clip=tiny_clip, text_cond=True)
    tokens, mask = module.text_condition(batch["caption"], batch["txt_tok"])
    fresh_tokens, fresh_mask = module.text_condition(batch["caption"])
    assert torch.equal(mask, fresh_mask) and mask.shape[1] < 32  # trimmed to the longest caption, as on the fly
    assert torch.allclose(tokens, fresh_tokens * fresh_mask[..., None], atol=1e-2)

    priors = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["img_emb", "txt_emb", "txt_tok", "caption"],
                                    cache_dir=str(cached), batch_size=8, shuffle=False)
    priors.setup()
    assert next(iter(priors.train_dataloader()))["txt_tok"].shape == (8, 32, tiny_clip.text_width)

    # a cache without token states serves the same stage without them (the module encodes the captions)
    plain = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=decoder_fields, cache_dir=cache_dir,
                                   batch_size=8, image_size=16, shuffle=False)
    plain.setup()
    assert "txt_tok" not in plain.fields and "txt_tok" not in next(iter(plain.train_dataloader()))
    # ... and cannot gain them shard by shard
    with pytest.raises(ValueError, match="built without caption token states"):
        embed(OmegaConf.merge(embed_cfg, {"token_states": True}))
