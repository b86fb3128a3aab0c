"""Result tables: markdown and CSV from rows of dicts, and JSON without NaN."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, Sequence


def cell(value) -> str:
    """A table cell: "-" for a missing number, 3 decimals below 100 and 1 above."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.3f}"
    return str(value)


def markdown(rows: list[dict], keys: Sequence[str], fmt: Callable = cell) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], keys: Sequence[str], path: Path) -> None:
    """The rows' ``keys`` (missing ones and None as empty cells)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def json_safe(value):
    """NaN as null (JSON has no NaN); tensors and numpy numbers as plain numbers."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
