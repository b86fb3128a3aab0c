"""Runs one of our training-step benchmarks in a fresh process, so the peak memory it reports is its own
(the peer's scripts do the same in their venv).

    python -m bench.worker prior '{"dim": 512, "depth": 6, "heads": 8, "batch": 64, "tokens": 77}'
    python -m bench.worker decoder '{"size": 64, "batch": 8, "dim": 64, "mults": [1, 2, 3, 4], "embed_dim": 512, "precision": "bf16-mixed"}'

Prints one JSON line: steps/s, parameter count, peak resident memory in MiB.
"""

from __future__ import annotations

import json
import resource
import sys

import torch


def peak_rss_mib() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(section: str, cfg: dict) -> None:
    torch.set_num_threads(cfg.get("threads", 2))
    if section == "prior":
        from bench.prior import ours
    elif section == "prior_other":
        from bench.prior import ours_other as ours
    elif section == "decoder":
        from bench.decoder import ours
    else:
        raise SystemExit(f"bench.worker: unknown section {section!r} (prior | prior_other | decoder)")
    result = ours(cfg, cfg.get("steps", 3), cfg.get("repeats", 2), cfg.get("precision", "32-true"))
    print(json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
