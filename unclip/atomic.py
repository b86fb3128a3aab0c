"""Files written whole or not at all: a temporary name beside the target, fsync, then a rename. Every writer
of checkpoints and converted stages goes through here (it imports nothing else of unclip, so any module may
use it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

PARTIAL = ".partial-"  # a write in progress: ``.NAME.partial-PID`` beside its target


def partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{PARTIAL}{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Makes a rename in ``folder`` durable (best effort: some filesystems refuse to open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``: ``path`` holds the old
    file or the new one, whole, whatever happens meanwhile; a failed write removes its temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_torch_save_all(objects: dict[Path, Any]) -> None:
    """Several files written together (a converted release's stages): each is first written whole under its
    temporary name, and only when all are on disk are they renamed into place, so a failure leaves none of them."""
    written: list[tuple[Path, Path]] = []
    try:
        for path, obj in objects.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = partial_path(path)
            written.append((tmp, path))
            with open(tmp, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, path in written:
        os.replace(tmp, path)
    for folder in {path.parent for _, path in written}:
        fsync_dir(folder)
