"""The chunked embedding cache: one cache shard per source shard, rows grouped in chunks.

A source shard ``NAME.tar`` has a cache shard ``NAME.tar`` in the cache directory whose members are
chunks of up to ``chunk_size`` rows::

    CHUNK.img_emb.npy   (n, D) float16   normalised CLIP image embeddings z_i
    CHUNK.txt_emb.npy   (n, D) float16   normalised CLIP text embeddings z_t
    CHUNK.keys.json     the n source keys, in row order
    CHUNK.captions.json the n captions (token states can then be computed on the fly)
    CHUNK.txt_tok.npy   optional (n, L, W) float16 caption token states

Per-sample members stream at ~5k samples/s; 1,024-row chunks at >200k/s. The cache directory also holds
``meta.json`` (CLIP identity, dim, counts per shard) and ``stats.npz`` (mean/std of z_i and z_t, PCA).
"""

from __future__ import annotations

import io
import json
import mmap
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds

EMBEDDING_MEMBERS = {"img_emb": "img_emb.npy", "txt_emb": "txt_emb.npy", "txt_tok": "txt_tok.npy"}
META_FILE = "meta.json"
STATS_FILE = "stats.npz"
INDEX_FILE = "index.json"  # partition layout only: key -> [cache shard, row]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def load_npy(data) -> np.ndarray:
    """An ``.npy`` member as an array. A memoryview (a member of a memory-mapped tar) is read in place:
    only the header is parsed, and the array is a read-only view of the file's pages."""
    view = memoryview(data)
    prefix = 10 if view[6:7] == b"\x01" else 12  # magic (6) + version (2) + header length (2 in v1, 4 after)
    header = io.BytesIO(view[:prefix + int.from_bytes(view[8:prefix], "little")])
    version = np.lib.format.read_magic(header)
    if version not in ((1, 0), (2, 0)):
        return np.load(io.BytesIO(view), allow_pickle=False)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(header)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in the embedding cache")
    count = int(np.prod(shape))
    array = np.frombuffer(view, dtype=dtype, count=count, offset=header.tell())
    return array.reshape(shape[::-1]).T if fortran_order else array.reshape(shape)


def write_cache_shard(path: Path, rows: dict[str, np.ndarray], keys: list[str], captions: list[str], chunk_size: int) -> None:
    """Writes one cache shard atomically: to ``path.tmp`` first, renamed when complete (kill -9 safe)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with wds.TarWriter(str(tmp)) as sink:
            for chunk, start in enumerate(range(0, len(keys), chunk_size)):
                stop = start + chunk_size
                member = {"__key__": f"chunk{chunk:06d}", "keys.json": json.dumps(keys[start:stop]).encode(),
                          "captions.json": json.dumps(captions[start:stop]).encode()}
                for field, array in rows.items():
                    member[EMBEDDING_MEMBERS[field]] = npy_bytes(np.ascontiguousarray(array[start:stop], dtype=np.float16))
                sink.write(member)
    except OSError as error:  # a full disk, a lost mount: nothing half-written is left under a shard's name
        tmp.unlink(missing_ok=True)
        raise OSError(error.errno, f"writing cache shard {path} failed ({error.strerror or error}); shards finished "
                                   f"before it are kept: free space and rerun to continue") from error
    os.replace(tmp, path)


@dataclass
class Chunk:
    keys: list[str]
    captions: list[str]
    arrays: dict[str, np.ndarray]  # field -> (n, ...) array

    def __len__(self) -> int:
        return len(self.keys)


def decode_chunk(sample: dict, fields: tuple[str, ...], dims: dict[str, int] | None = None) -> Chunk:
    """Decodes the members that ``fields`` need; raises ValueError naming a member that is missing or has the wrong shape."""
    keys = json.loads(bytes(sample["keys.json"]))
    captions = json.loads(bytes(sample["captions.json"])) if "captions.json" in sample else [""] * len(keys)
    arrays = {}
    for field in fields:
        member = EMBEDDING_MEMBERS[field]
        if member not in sample:
            raise ValueError(f"chunk {sample.get('__key__')} of {sample.get('__url__')} has no {member}")
        array = load_npy(sample[member])
        if array.shape[0] != len(keys):
            raise ValueError(f"chunk {sample.get('__key__')}: {member} has {array.shape[0]} rows for {len(keys)} keys")
        if dims and field in dims and array.shape[-1] != dims[field]:
            raise ValueError(f"chunk {sample.get('__key__')}: {member} has dim {array.shape[-1]}, expected {dims[field]}")
        arrays[field] = array
    return Chunk(keys, captions, arrays)


def local_file(url: str) -> str | None:
    """The path of a URL that names a local file (not ``pipe:`` or a remote scheme), else None."""
    path = url[len("file:"):] if url.startswith("file:") else url
    return path if "://" not in path and not path.startswith("pipe:") and os.path.isfile(path) else None


def mapped_tar_samples(path: str) -> list[dict]:
    """The samples of a local tar with members as memoryviews into one read-only mmap: nothing is
    copied until a batch is cut, which is what lets the embeddings-only path exceed 200k rows/s on
    one core (streaming the same tar through ``tarfile`` reads and copies every byte twice). Members
    are grouped into samples as webdataset does: the key is the name up to the first dot of the basename."""
    with open(path, "rb") as f:
        view = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    with tarfile.open(path, "r:") as tar:  # reads the 512-byte headers and seeks over the data
        members = [m for m in tar if m.isfile()]
    samples: list[dict] = []
    for member in members:
        folder, base = os.path.split(member.name)
        key, _, suffix = base.partition(".")
        key = f"{folder}/{key}" if folder else key
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key, "__url__": path})
        samples[-1][suffix.lower()] = view[member.offset_data:member.offset_data + member.size]
    return samples


def tar_samples(url: str, handler):
    """A cache shard's samples: memory-mapped for local files, streamed by webdataset otherwise (``pipe:``,
    object stores) or when the local tar cannot be indexed (truncated: the stream then reports it)."""
    path = local_file(url)
    if path is not None:
        try:
            return mapped_tar_samples(path)
        except (tarfile.TarError, ValueError, OSError):
            pass
    return wds.tariterators.tarfile_samples([{"url": url}], handler=handler)


def iter_chunks(url: str, fields: tuple[str, ...], handler, dims: dict[str, int] | None = None):
    """Yields the chunks of one cache shard; a chunk that fails to decode goes to ``handler``."""
    for sample in tar_samples(url, handler):
        try:
            yield decode_chunk(sample, fields, dims)
        except Exception as exn:  # noqa: BLE001 - the handler decides (count and continue, or raise)
            if not handler(exn):
                return


def read_cache_shard(url: str, fields: tuple[str, ...], handler=wds.reraise_exception, dims=None) -> dict:
    """Loads one cache shard whole: ``{"keys": [...], field: (n, D)}``; used to join image shards by key."""
    keys, captions, arrays = [], [], {f: [] for f in fields}
    for chunk in iter_chunks(url, fields, handler, dims):
        keys += chunk.keys
        captions += chunk.captions
        for field in fields:
            arrays[field].append(chunk.arrays[field])
    out = {f: (np.concatenate(a) if a else np.zeros((0, (dims or {}).get(f, 0)), np.float16)) for f, a in arrays.items()}
    out["keys"], out["captions"] = keys, captions
    return out


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"no embedding cache at {cache_dir} ({META_FILE} missing); build it with "
            f"`python embed.py data=... clip=...`, or point data.cache_dir at an existing cache")
    return json.loads(path.read_text())


def write_meta(cache_dir: str | Path, meta: dict) -> None:
    path = Path(cache_dir) / META_FILE
    tmp = path.with_name(META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
    os.replace(tmp, path)


def check_identity(meta: dict, identity: dict, cache_dir) -> None:
    """Refuses a cache made by another CLIP: the sha256 of the weights when both sides know it, else the model name."""
    cached = meta.get("clip", {})
    same = meta.get("dim", identity.get("dim")) == identity.get("dim")
    if cached.get("sha256") is not None and identity.get("sha256") is not None:  # the weights decide, whatever their name
        same = same and cached.get("sha256") == identity.get("sha256")
    else:  # ingested caches (clip-retrieval) know the model name, not the weights
        same = same and cached.get("model") == identity.get("model")
    if not same:
        raise ValueError(
            f"embedding cache {cache_dir} was made with CLIP {cached.get('model')} (weights {str(cached.get('sha256'))[:12]}, "
            f"dim {meta.get('dim')}), but this run uses {identity.get('model')} (weights {str(identity.get('sha256'))[:12]}, "
            f"dim {identity.get('dim')}); rerun `python embed.py` with this clip=, or set clip= to the cache's CLIP")


def write_stats(cache_dir: str | Path, stats: dict[str, np.ndarray]) -> None:
    """Writes ``stats.npz`` atomically: a rerun decides from its presence whether to fit the stats again, so a
    kill mid-write must not leave a cut-short one under its name."""
    path = Path(cache_dir) / STATS_FILE
    tmp = path.with_name(STATS_FILE + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **stats)
    os.replace(tmp, path)


def load_stats(cache_dir: str | Path) -> dict[str, np.ndarray]:
    path = Path(cache_dir) / STATS_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {STATS_FILE} in embedding cache {cache_dir}; rerun `python embed.py`")
    with np.load(path) as stats:
        return {k: stats[k] for k in stats.files}


class ShardRows:
    """The rows of one cache shard, looked up by sample key."""

    def __init__(self, table: dict, fields: tuple[str, ...]):
        self.table, self.fields = table, fields
        self.index = {key: row for row, key in enumerate(table["keys"])}

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, key: str) -> dict[str, np.ndarray] | None:
        row = self.index.get(key)
        return None if row is None else {f: self.table[f][row] for f in self.fields}


class PartitionRows:
    """Rows of a partition-layout cache (clip-retrieval), found through ``index.json``: key -> (shard, row).
    Partitions load on first use and the last few stay in memory (source shards tend to follow them)."""

    def __init__(self, cache_dir: str | Path, fields: tuple[str, ...], handler=wds.reraise_exception, keep: int = 2):
        self.cache_dir, self.fields, self.handler, self.keep = Path(cache_dir), fields, handler, keep
        self.index = json.loads((self.cache_dir / INDEX_FILE).read_text())
        self.loaded: dict[str, dict] = {}

    def __len__(self) -> int:
        return len(self.index)

    def lookup(self, key: str) -> dict[str, np.ndarray] | None:
        where = self.index.get(key)
        if where is None:
            return None
        shard, row = where
        if shard not in self.loaded:
            if len(self.loaded) >= self.keep:
                self.loaded.pop(next(iter(self.loaded)))
            self.loaded[shard] = read_cache_shard(str(self.cache_dir / shard), self.fields, self.handler)
        table = self.loaded[shard]
        return {f: table[f][row] for f in self.fields}
