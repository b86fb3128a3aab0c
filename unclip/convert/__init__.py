"""``python -m unclip.convert kind=KIND src=DIR out=PATH``: published unCLIP weights -> unclip stage
checkpoints that ``unclip.load`` opens (weights only), fine-tuning starts from (``init_from=``) and
evaluation ranks.

One file per family of published formats, each with its ``KINDS`` (kind -> ``(src: Path, options: dict)
-> checkpoint dict``); :mod:`unclip.convert.common` holds what they share. The checkpoint is written to a
temporary file and renamed: nothing reaches ``out`` unless the conversion succeeded.

A kind whose function has ``parts`` (karlo: prior, decoder, upsampler) is called ``(src, options, part)`` and
returns its stages by part name: ``out=FOLDER`` gets ``PART.ckpt`` for each (``part=all``, the default there),
``out=FILE.ckpt`` the one stage ``part=`` names (the first part by default: karlo's prior, as before). All are
written to temporary names first and renamed together.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable

from unclip.atomic import atomic_torch_save, atomic_torch_save_all
from unclip.convert.common import ConversionError

USAGE = ("usage: python -m unclip.convert kind=KIND src=DIR out=PATH|FOLDER [part=prior|decoder|upsampler|all] "
         "[clip_model=NAME] [clip_pretrained=TAG|none] [clip_init_seed=N] [weights=FILE]")


def kinds() -> dict[str, Callable[[Path, dict], dict]]:
    from unclip.convert import dalle2_pytorch_prior, diffusers_prior, karlo

    return {**diffusers_prior.KINDS, **karlo.KINDS, **dalle2_pytorch_prior.KINDS}


def convert(kind_name: str, src: str | Path, out: str | Path, **options) -> Path:
    """Converts the published folder ``src`` into the stage checkpoint ``out`` (written atomically)."""
    known = kinds()
    if kind_name not in known:
        raise ConversionError(f"unknown kind {kind_name!r}; known kinds: {', '.join(sorted(known))}")
    src = Path(src)
    if not src.is_dir():
        raise ConversionError(f"src={src} is not a folder; expected the published {kind_name} folder")
    function, out, part = known[kind_name], Path(out), options.pop("part", None)
    parts = getattr(function, "parts", None)
    if parts is None:
        if part is not None:
            raise ConversionError(f"kind {kind_name} converts one stage; part= is for kinds of several "
                                  f"({', '.join(k for k, f in known.items() if hasattr(f, 'parts'))})")
        atomic_torch_save(function(src, options), out)
        return out
    one_file = out.suffix == ".ckpt"
    stages = function(src, options, part or (parts[0] if one_file else "all"))
    if one_file and len(stages) > 1:
        raise ConversionError(f"part={part} gives {len(stages)} stages ({', '.join(stages)}) but out={out} is one file; "
                              f"give out=FOLDER or part={'|'.join(parts)}")
    atomic_torch_save_all({out if one_file else out / f"{name}.ckpt": checkpoint for name, checkpoint in stages.items()})
    return out


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
    written = [path] if path.suffix == ".ckpt" else sorted(path.glob("*.ckpt"))
    print(f"wrote {', '.join(map(str, written))} ({kind_name} from {src})")
