"""Seeds that are pure functions of their parts, so that data order, noise and dropout depend on
(seed, epoch, step, rank, worker) alone and a resumed or re-run job repeats the original."""

from __future__ import annotations

import hashlib

from torch.utils.data import get_worker_info


def hash_seed(*parts) -> int:
    """A seed that is a pure function of ``parts`` (Python's ``hash`` of a str changes per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1



def worker_seed(*parts) -> int:
    info = get_worker_info()
    return hash_seed(*parts, info.id if info else 0)

