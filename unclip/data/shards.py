"""Shard specs to URLs, and how many samples each shard holds.

Specs may be lists, brace patterns (``a-{000..009}.tar``), globs, directories or remote/``pipe:`` URLs;
a local spec that matches nothing fails here, at setup, with a message naming it.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Sequence

import braceexpand

log = logging.getLogger(__name__)

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://")


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

