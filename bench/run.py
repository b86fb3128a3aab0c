"""``make bench``: throughput benchmarks; writes ``bench/results.md`` and prints the table.

Measured here: the embeddings-only DataModule path (chunked cache) next to the per-sample-member layout it
replaced, the image path, and the embed job's images/s. Every number is the best of ``--repeats`` runs on
the current machine; nothing is timed inside the test suite.
"""

from __future__ import annotations

import argparse
import io
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from unclip.data.cache import write_cache_shard, write_meta
from unclip.data.datamodule import CaptionImageDataModule

RESULTS = Path(__file__).parent / "results.md"


def best_of(repeats: int, fn) -> float:
    """The fastest of ``repeats`` timings of ``fn()``, which returns the number of items it processed."""
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        items = fn()
        rates.append(items / (time.perf_counter() - start))
    return max(rates)


def synthetic_cache(directory: Path, shards: int, rows: int, dim: int) -> list[str]:
    rng = np.random.default_rng(0)
    names = []
    for shard in range(shards):
        name = f"bench-{shard:05d}.tar"
        keys = [f"s{shard:03d}{i:07d}" for i in range(rows)]
        emb = {f: rng.standard_normal((rows, dim)).astype(np.float16) for f in ("img_emb", "txt_emb")}
        write_cache_shard(directory / name, emb, keys, ["a caption"] * rows, chunk_size=1024)
        names.append(name)
    write_meta(directory, {"dim": dim, "counts": {n: rows for n in names}, "clip": {}})
    return names


def per_sample_shard(path: Path, rows: int, dim: int) -> None:
    """The layout the chunked cache replaced: one KEY.img_emb.npy + KEY.txt_emb.npy per sample."""
    rng = np.random.default_rng(0)
    with wds.TarWriter(str(path)) as sink:
        for i in range(rows):
            sample = {"__key__": f"k{i:08d}"}
            for field in ("img_emb", "txt_emb"):
                buffer = io.BytesIO()
                np.save(buffer, rng.standard_normal(dim).astype(np.float16))
                sample[f"{field}.npy"] = buffer.getvalue()
            sink.write(sample)


def bench_embeddings(tmp: Path, repeats: int, dim: int = 768, batch: int = 256) -> dict:
    cache = tmp / "cache"
    cache.mkdir()
    synthetic_cache(cache, shards=4, rows=16384, dim=dim)
    dm = CaptionImageDataModule(train=[str(cache / f"bench-{i:05d}.tar") for i in range(4)], fields=["img_emb", "txt_emb"],
                                cache_dir=str(cache), batch_size=batch, num_workers=0)
    dm.setup()

    def chunked():
        return sum(len(b["key"]) for b in dm.train_dataloader())

    per_sample = tmp / "per_sample.tar"
    per_sample_shard(per_sample, 16384, dim)

    def members():
        stream = wds.WebDataset(str(per_sample), shardshuffle=False).decode().to_tuple("img_emb.npy", "txt_emb.npy").batched(batch)
        return sum(len(b[0]) for b in stream)

    return {"chunked": best_of(repeats, chunked), "per_sample": best_of(repeats, members)}


def bench_images(shapes: Path, repeats: int, batch: int = 64) -> float:
    dm = CaptionImageDataModule(train=str(shapes / "train-*.tar"), fields=["image", "caption"], batch_size=batch,
                                image_size=64, num_workers=0)
    dm.setup()

    def run():
        count = 0
        for b in dm.train_dataloader():
            count += len(b["key"])
            if count >= 2048:
                break
        return count

    return best_of(repeats, run)


def bench_embed(model_name: str, shapes: Path, batch: int, n: int) -> float:
    from PIL import Image

    from unclip.clip import FrozenCLIP

    clip = FrozenCLIP(model_name)
    images = [s["png"] for s, _ in zip(wds.WebDataset(str(shapes / "train-00000.tar"), shardshuffle=False).decode("pil"), range(batch))]
    captions = ["a small red circle in the top left"] * batch
    assert all(isinstance(i, Image.Image) for i in images)

    def run():
        done = 0
        while done < n:
            clip.encode_image(images)
            clip.encode_text(captions)
            done += batch
        return done

    return best_of(2, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-vit", action="store_true", help="skip the ViT-B-32 embed benchmark")
    parser.add_argument("--only", choices=["data", "prior", "decoder", "sampling"], help="run one section")
    parser.add_argument("--threads", type=int, default=2, help="torch threads for ours and the peer alike")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    if args.only in (None, "prior"):
        from bench import prior

        rows += prior.rows(args.threads)
    if args.only in (None, "decoder"):
        from bench import decoder

        rows += decoder.rows(threads=args.threads)
    if args.only in (None, "sampling"):
        from bench import sampling
        from bench.diffusers_latency import diffusers_rows

        rows += sampling.defaults_rows() + sampling.rows() + diffusers_rows()
    if args.only in ("prior", "decoder", "sampling"):
        return report(rows, RESULTS.with_name(f"results_{args.only}.md"))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from unclip.data.shapes import ShapesConfig, write_shapes

        shapes = write_shapes(ShapesConfig(out=str(tmp / "shapes"), n=2048, n_val=64, n_val_unseen=64, shards=4))
        emb = bench_embeddings(tmp, args.repeats)
        rows.append(("DataModule, embeddings only (chunked cache, dim 768, batch 256, 1 core)", f"{emb['chunked']:,.0f} samples/s",
                     "goal ≥ 200,000"))
        rows.append(("reference: per-sample .npy members (webdataset decode + batched)", f"{emb['per_sample']:,.0f} samples/s",
                     f"chunked is {emb['chunked'] / emb['per_sample']:.0f}x"))
        rows.append(("DataModule, image + caption (64 px PNG, batch 64, 1 core)", f"{bench_images(shapes, args.repeats):,.0f} samples/s", ""))
        rows.append(("embed: unclip-tiny, batch 64 (image + text)", f"{bench_embed('unclip-tiny', shapes, 64, 512):,.0f} pairs/s", ""))
        if not args.skip_vit:
            rows.append(("embed: ViT-B-32 random weights, batch 64 (image + text)",
                         f"{bench_embed('ViT-B-32', shapes, 64, 128):,.1f} pairs/s", ""))
    report(rows, RESULTS)


def report(rows: list[tuple[str, str, str]], path: Path) -> None:
    table = ["| benchmark | result | note |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    header = (f"# Benchmarks\n\n`make bench` on {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.\n\n")
    path.write_text(header + "\n".join(table) + "\n")
    print("\n".join(table))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
