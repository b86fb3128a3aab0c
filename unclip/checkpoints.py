"""Checkpoint files that survive a kill: written atomically, and resumed from the newest one that reads.

A run killed with SIGKILL, a node that loses power or a disk that fills mid-write must not leave a cut-short
file under a checkpoint's name, and a rerun of the same command must not die on one that an older version
(or a disk error) left there: it says which file is unreadable and resumes from the newest one that reads.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from unclip.atomic import PARTIAL, atomic_torch_save
from unclip.loading import CheckpointError, read_checkpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made kill-safe for local paths (see :func:`atomic_torch_save`). Lightning's
    own stages the bytes in the system temp dir (often another disk on a cluster: the last step is then a copy
    into place, cut short by a kill) without fsync, and a killed write leaves its temp file behind there.
    Remote paths (``s3://``...) keep Lightning's writer. Single-device and DDP strategies write through it on
    rank 0; FSDP's full-state checkpoints too."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_torch_save(checkpoint, path)


def clear_partial_writes(folder: Path) -> list[Path]:
    """Removes the temporary files of writes that were killed (the folder's own, before a run writes there)."""
    stale = sorted(folder.glob(f".*{PARTIAL}*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info("removed %d partial checkpoint write(s) left by a killed run in %s", len(stale), folder)
    return stale


def checkpoint_step(path: Path) -> int:
    """The checkpoint's global step, read without loading its tensors (mmap); :class:`CheckpointError` if
    the file does not read as a checkpoint (cut short, another format)."""
    state = read_checkpoint(path, mmap=True)
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"{path} is a torch file but not a training checkpoint (no global_step)", "no global_step")
    return int(state["global_step"])


def resume_checkpoint(folder: Path, last: str = "last.ckpt", warn: bool = True) -> Path | None:
    """``folder/last.ckpt`` when it reads; if it does not, the newest other checkpoint in ``folder`` that
    does, or None (start afresh), with a warning naming the unreadable file. None when there is no last.ckpt.
    Every rank decides alike from the same files; only ``warn`` (rank 0) logs."""
    path = folder / last
    if not path.exists():
        return None
    if path.is_dir():  # a sharded (FSDP state_dict_type=sharded) checkpoint: a folder that Lightning reads itself
        return path
    try:
        checkpoint_step(path)
        return path
    except CheckpointError as error:
        reason = error.reason or str(error)
    others = []
    for candidate in folder.glob("*.ckpt"):
        if candidate != path and candidate.is_file():
            try:
                others.append((checkpoint_step(candidate), candidate))
            except CheckpointError:
                pass
    head = (f"{path} is unreadable ({reason}): cut short by a kill or a full disk mid-write, or damaged; "
            f"it is left in place and the next checkpoint overwrites it;")
    if others:
        step, newest = max(others)
        if warn:
            log.warning("%s resuming from %s (step %d) instead", head, newest, step)
        return newest
    if warn:
        log.warning("%s no other readable checkpoint in %s: starting afresh", head, folder)
    return None
