"""``python -m unclip.convert kind=KIND src=DIR out=PATH``: published unCLIP weights -> unclip stage
checkpoints that ``unclip.load`` opens (weights only), fine-tuning starts from (``init_from=``) and
evaluation ranks.

One file per family of published formats, each with its ``KINDS`` (kind -> ``(src: Path, options: dict)
-> checkpoint dict``); :mod:`unclip.convert.common` holds what they share. The checkpoint is written to a
temporary file and renamed: nothing reaches ``out`` unless the conversion succeeded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from unclip.checkpoints import atomic_torch_save
from unclip.convert.common import ConversionError

USAGE = ("usage: python -m unclip.convert kind=KIND src=DIR out=PATH [clip_model=NAME] [clip_pretrained=TAG|none] "
         "[clip_init_seed=N] [weights=FILE]")


def kinds() -> dict[str, Callable[[Path, dict], dict]]:
    from unclip.convert import dalle2_pytorch_prior, diffusers_prior

    return {**diffusers_prior.KINDS, **dalle2_pytorch_prior.KINDS}


def convert(kind_name: str, src: str | Path, out: str | Path, **options) -> Path:
    """Converts the published folder ``src`` into the stage checkpoint ``out`` (written atomically)."""
    known = kinds()
    if kind_name not in known:
        raise ConversionError(f"unknown kind {kind_name!r}; known kinds: {', '.join(sorted(known))}")
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"src={src} is not a folder; expected the published {kind_name} folder")
    checkpoint = known[kind_name](src, options)
    atomic_torch_save(checkpoint, out)
    return Path(out)


__all__ = ["ConversionError", "convert", "kinds", "main"]


def main(argv: list[str] | None = None) -> None:
    pairs = sys.argv[1:] if argv is None else argv
    bad = [a for a in pairs if "=" not in a]
    if bad:
        raise SystemExit(f"unclip.convert: arguments are key=value, got {bad}; {USAGE}")
    args = dict(a.split("=", 1) for a in pairs)
    missing = [k for k in ("kind", "src", "out") if k not in args]
    if missing:
        raise SystemExit(f"unclip.convert: missing {missing}; {USAGE}; kinds: {', '.join(sorted(kinds()))}")
    kind_name, src, out = args.pop("kind"), args.pop("src"), args.pop("out")
    path = convert(kind_name, src, out, **args)
    print(f"wrote {path} ({kind_name} from {src})")
