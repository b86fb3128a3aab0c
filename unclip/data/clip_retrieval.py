"""Ingest clip-retrieval ``inference`` output into the chunked embedding cache.

clip-retrieval writes rows per *partition*, not per tar shard::

    DIR/img_emb/img_emb_0.npy     (n, D) float16, L2-normalised
    DIR/text_emb/text_emb_0.npy   (n, D)
    DIR/metadata/metadata_0.parquet   columns: key (or image_path), caption; row-aligned with the .npy files

Each partition becomes a cache shard named after it (``part-00000.tar``), and ``meta.json`` records the
layout (``"layout": "partitions"``) and the partitions. The image path joins source samples to these rows
by key through a key index, never by position.

    python -m unclip.data.clip_retrieval src=DIR cache_dir=outputs/cache/mydata/vit_b_32 model=ViT-B-32
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from unclip.data import cache as cache_lib
from unclip.data.stats import compute_stats


def read_keys(parquet: Path) -> tuple[list[str], list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exn:  # pragma: no cover - pyarrow ships with the dev extra
        raise ImportError("reading clip-retrieval metadata needs pyarrow: pip install pyarrow") from exn
    table = pq.read_table(parquet)
    columns = set(table.column_names)
    if "key" in columns:
        keys = [str(k) for k in table.column("key").to_pylist()]
    elif "image_path" in columns:
        keys = [Path(str(p)).stem for p in table.column("image_path").to_pylist()]
    else:
        raise ValueError(f"{parquet} has neither a 'key' nor an 'image_path' column (columns: {sorted(columns)})")
    captions = [str(c or "") for c in table.column("caption").to_pylist()] if "caption" in columns else [""] * len(keys)
    return keys, captions


def partitions(src: Path) -> list[int]:
    found = sorted(int(m.group(1)) for p in (src / "img_emb").glob("img_emb_*.npy") if (m := re.search(r"_(\d+)\.npy$", p.name)))
    if not found:
        raise FileNotFoundError(f"no img_emb/img_emb_*.npy under {src}; is it clip-retrieval inference output?")
    return found


def ingest(src: str | Path, cache_dir: str | Path, model: str, chunk_size: int = 1024) -> dict:
    """Writes one cache shard per partition, plus ``meta.json`` and ``stats.npz`` (fit on every partition)."""
    src, cache_dir = Path(src), Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta = {"layout": "partitions", "clip": {"model": model, "sha256": None, "source": "clip-retrieval"},
            "counts": {}, "skipped": {}, "splits": {}, "chunk_size": chunk_size}
    index: dict[str, list] = {}
    for part in partitions(src):
        img = np.load(src / "img_emb" / f"img_emb_{part}.npy")
        txt = np.load(src / "text_emb" / f"text_emb_{part}.npy")
        keys, captions = read_keys(src / "metadata" / f"metadata_{part}.parquet")
        if not len(img) == len(txt) == len(keys):
            raise ValueError(f"partition {part} of {src}: {len(img)} image rows, {len(txt)} text rows, {len(keys)} keys")
        meta["dim"] = int(img.shape[1])
        name = f"part-{part:05d}.tar"
        cache_lib.write_cache_shard(cache_dir / name, {"img_emb": img, "txt_emb": txt}, keys, captions, chunk_size)
        meta["counts"][name], meta["splits"][name] = len(keys), "train"
        index.update({key: [name, row] for row, key in enumerate(keys)})
    (cache_dir / cache_lib.INDEX_FILE).write_text(json.dumps(index))
    cache_lib.write_stats(cache_dir, compute_stats(cache_dir, sorted(meta["counts"])))
    meta["embedded"] = sum(meta["counts"].values())
    cache_lib.write_meta(cache_dir, meta)
    return meta


def main(argv: list[str] | None = None) -> None:
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv))
    missing = {"src", "cache_dir", "model"} - set(args)
    if missing:
        raise SystemExit(f"unclip.data.clip_retrieval: missing {sorted(missing)}; usage: src=DIR cache_dir=DIR model=NAME [chunk_size=N]")
    meta = ingest(args["src"], args["cache_dir"], args["model"], int(args.get("chunk_size", 1024)))
    print(f"ingested {meta['embedded']} rows from {len(meta['counts'])} partitions into {args['cache_dir']}")


if __name__ == "__main__":
    main()
