"""Bad input that the other test files do not already cover: prompts far past CLIP's context or in any
script, an empty shard among good ones, and a disk that fills while the embedding cache is written."""

import errno

import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf

from unclip.data import cache as cache_lib


def test_huge_and_unicode_prompts_are_truncated_to_the_context_and_encode(tiny_clip):
    prompts = ["a red circle " * 2000, "un cercle rouge 🔴 — 赤い円", ""]
    text = tiny_clip.encode_text(prompts)
    assert text.z_txt.shape == (3, tiny_clip.embed_dim) and torch.isfinite(text.z_txt).all()
    assert text.tokens.shape[1] <= tiny_clip.context_length  # cut at the context, not an error
    assert torch.allclose(text.z_txt.norm(dim=-1), torch.ones(3), atol=1e-4)


def test_an_empty_shard_among_good_ones_is_embedded_as_empty_and_read_past(shapes_dir, embed_cfg, tmp_path):
    from unclip.data.datamodule import CaptionImageDataModule
    from unclip.embed import embed

    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / "train-00000.tar").write_bytes((shapes_dir / "train-00000.tar").read_bytes())
    with wds.TarWriter(str(folder / "train-00001.tar")):
        pass  # a valid tar with no sample
    cfg = OmegaConf.merge(embed_cfg, {"data": {"train": str(folder), "cache_dir": str(tmp_path / "cache")}, "splits": ["train"]})
    meta = embed(cfg)
    assert meta["counts"]["train-00001.tar"] == 0 and meta["counts"]["train-00000.tar"] > 0
    dm = CaptionImageDataModule(train=str(folder), fields=["img_emb", "txt_emb"], cache_dir=str(tmp_path / "cache"),
                                batch_size=4, embed_dim=meta["dim"], shuffle=False)
    dm.setup()
    rows = sum(len(b["key"]) for b in dm.train_dataloader())
    assert rows == (meta["counts"]["train-00000.tar"] // 4) * 4  # every full batch of the good shard


def test_a_disk_full_while_writing_the_cache_names_the_shard_keeps_finished_ones_and_reruns(shapes_dir, embed_cfg,
                                                                                            tmp_path, monkeypatch):
    from unclip.embed import embed

    cache = tmp_path / "cache"
    cfg = OmegaConf.merge(embed_cfg, {"data": {"cache_dir": str(cache)}, "splits": ["train"]})
    write, calls = wds.TarWriter.write, []

    def filling_write(self, obj):
        calls.append(1)
        if len(calls) > 3:  # the first shard's chunks fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, obj)

    monkeypatch.setattr(wds.TarWriter, "write", filling_write)
    with pytest.raises(OSError, match=r"writing cache shard .*train-0000\d\.tar failed \(No space left on device\).*rerun"):
        embed(cfg)
    finished = set(cache_lib.read_meta(cache)["counts"])
    assert sorted(p.name for p in cache.glob("*.tar")) == sorted(finished)  # nothing half-written under a shard's name
    assert not list(cache.glob("*.tmp"))
    monkeypatch.setattr(wds.TarWriter, "write", write)
    meta = embed(cfg)
    assert set(meta["counts"]) > finished and meta["embedded"] == 96
