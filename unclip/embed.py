"""Build the chunked embedding cache: a frozen CLIP embeds every caption-image pair once.

    python embed.py                       # data=shapes clip=shapes_tiny by default
    python embed.py clip=vit_b_32 clip.pretrained=/ckpt/vit-b-32.pt data=webdataset data.train=...

For each source shard ``NAME.tar`` it writes the cache shard ``NAME.tar`` (see ``unclip.data.cache``),
atomically, so a killed job loses at most the shard in progress; a rerun skips finished shards. At the
end it writes ``stats.npz`` (mean/std of z_i and z_t, PCA of z_i; train shards only) and ``meta.json``.
"""

from __future__ import annotations

import io
import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from tqdm import tqdm

from unclip.data import cache as cache_lib
from unclip.loading import pick_device
from unclip.data.decoding import SkipCounter, SkipSample, decode_source_sample, image_member, tar_samples
from unclip.data.shards import resolve_shards, shard_name, shard_sizes
from unclip.data.stats import STATS_VERSION, compute_stats

log = logging.getLogger(__name__)


def open_rgb(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


class ShardEmbedder:
    """Embeds one source shard in batches: images through open_clip's own preprocessing, captions
    through its tokenizer; corrupt or incomplete samples are skipped and counted."""

    def __init__(self, clip, batch_size: int = 256, token_states: bool = False):
        self.clip, self.batch_size, self.token_states = clip, batch_size, token_states

    def __call__(self, url: str, progress: tqdm | None = None) -> tuple[dict, Counter]:
        skips = SkipCounter()
        keys, captions, images = [], [], []
        out: dict[str, list] = {"keys": [], "captions": [], "img_emb": [], "txt_emb": [], "txt_tok": []}

        def flush():
            if not keys:
                return
            z_img = self.clip.encode_image(images)
            text = self.clip.encode_text(captions)
            out["img_emb"].append(z_img.half().cpu().numpy())
            out["txt_emb"].append(text.z_txt.half().cpu().numpy())
            if self.token_states:
                out["txt_tok"].append((text.tokens * text.mask[..., None]).half().cpu().numpy())
            out["keys"].extend(keys)
            out["captions"].extend(captions)
            if progress is not None:
                progress.update(len(keys))
            keys.clear(), captions.clear(), images.clear()

        for sample, cut_short in tar_samples(url, skips):
            try:
                decoded = decode_source_sample(sample, {"caption"}, None, None, None, None)
                ext = image_member(sample)
                if ext is None:
                    raise SkipSample("missing_image", f"{sample['__key__']} has no image member")
                try:
                    image = open_rgb(sample[ext])
                except Exception as exn:  # noqa: BLE001 - PIL raises many types for corrupt files
                    raise SkipSample("corrupt_image", f"{sample['__key__']}: {exn!r}") from exn
            except SkipSample as skip:
                if not cut_short:  # a sample the tar's read error cut short is counted with that error
                    skips.skip(skip.reason, str(skip))
                continue
            keys.append(decoded["key"])
            captions.append(decoded["caption"])
            images.append(image)
            if len(keys) == self.batch_size:
                flush()
        flush()
        dim = self.clip.embed_dim
        rows = {f: (np.concatenate(out[f]) if out[f] else np.zeros((0, dim), np.float16)) for f in ("img_emb", "txt_emb")}
        if self.token_states and out["txt_tok"]:
            rows["txt_tok"] = np.concatenate(out["txt_tok"])
        return {"rows": rows, "keys": out["keys"], "captions": out["captions"]}, skips.total


def cache_token_states(meta: dict, wanted: bool, cache_dir) -> bool:
    """Whether this run caches caption token states: every shard of a cache holds them or none does, so a
    cache that has them keeps them, and one embedded without them cannot gain them shard by shard."""
    if meta.get("token_states"):
        return True
    if wanted and meta["counts"]:
        raise ValueError(f"embedding cache {cache_dir} was built without caption token states; to cache them, embed "
                         f"into a new data.cache_dir (or delete this one) with token_states=true")
    return wanted


def embed(cfg: DictConfig) -> dict:
    """Embeds every split's shards that are not cached yet; returns the cache meta."""
    clip = instantiate(cfg.clip, _convert_="all").to(pick_device(cfg.get("device", "auto")))
    identity = clip.identity()
    cache_dir = Path(cfg.data.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        meta = cache_lib.read_meta(cache_dir)
        cache_lib.check_identity(meta, identity, cache_dir)
    except FileNotFoundError:
        meta = {"clip": identity, "dim": clip.embed_dim, "chunk_size": int(cfg.chunk_size), "counts": {}, "skipped": {}, "splits": {}}
    token_states = cache_token_states(meta, bool(cfg.token_states), cache_dir)
    if token_states:
        meta["token_states"], meta["token_width"] = True, int(clip.text_width)
    embedder = ShardEmbedder(clip, batch_size=int(cfg.batch_size), token_states=token_states)
    todo = []
    for split in cfg.splits:
        spec = cfg.data.get(split)
        if spec:
            todo += [(split, url) for url in resolve_shards(OmegaConf.to_container(spec) if not isinstance(spec, str) else spec)]
    sizes = shard_sizes([u for _, u in todo])
    pending = [(s, u) for s, u in todo if not ((cache_dir / shard_name(u)).exists() and shard_name(u) in meta["counts"])]
    total = sum(sizes.get(shard_name(u), 0) for _, u in pending)
    log.info("embedding %d of %d shards into %s", len(pending), len(todo), cache_dir)
    start, embedded = time.perf_counter(), 0
    with tqdm(total=total, unit="img", desc="embed", disable=not cfg.progress) as progress:
        for split, url in pending:
            name = shard_name(url)
            table, skipped = embedder(url, progress)
            cache_lib.write_cache_shard(cache_dir / name, table["rows"], table["keys"], table["captions"], int(cfg.chunk_size))
            meta["counts"][name], meta["skipped"][name], meta["splits"][name] = len(table["keys"]), dict(skipped), split
            embedded += len(table["keys"])
            cache_lib.write_meta(cache_dir, meta)  # after every shard: a kill loses only the shard in progress
            if skipped:
                log.warning("%s: skipped %s", name, dict(skipped))
    elapsed = time.perf_counter() - start
    train = sorted(n for n, s in meta["splits"].items() if s == "train")
    stale = meta.get("stats_version") != STATS_VERSION  # stats of an older release lack newer entries
    if pending or stale or not (cache_dir / cache_lib.STATS_FILE).exists():
        if not train:
            raise ValueError(f"no train shards embedded in {cache_dir}; stats (mean/std, PCA) are fit on train only")
        stats = compute_stats(cache_dir, train)
        cache_lib.write_stats(cache_dir, stats)
        meta["baseline_cos"] = float(stats["baseline_cos"])
        meta["stats_version"] = STATS_VERSION
    meta["embedded"] = sum(meta["counts"].values())
    meta["skipped_total"] = sum(sum(v.values()) for v in meta["skipped"].values())
    cache_lib.write_meta(cache_dir, meta)
    if pending:
        log.info("embedded %d samples in %.1fs (%.0f img/s)", embedded, elapsed, embedded / max(elapsed, 1e-9))
    return meta
