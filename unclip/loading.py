"""``unclip.load``: one loader for every trained stage, used by evaluation, sampling and the pipeline.

A stage is a Lightning checkpoint whose ``state_dict`` holds the EMA weights and whose hyperparameters
are plain containers (``kind``, net, diffusion, ...), so it loads with ``weights_only=True`` and without
Hydra. The frozen CLIP is named in the hyperparameters by its identity; it is rebuilt from there (or
passed in) and refused when its weights differ.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import torch

import unclip.modules  # noqa: F401  (registers the built-in stage kinds)
from unclip import registry


class CheckpointError(ValueError):
    """A file that is not a readable unclip checkpoint: truncated, another format, or no checkpoint at all.
    ``reason``: what failed, in a few words (torch's error, first sentence)."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason


def torch_reason(text: str) -> str:
    """torch's error in a few words: the weights-only unpickler's own finding (``Unsupported operand 110``,
    ``Unsupported global: GLOBAL x.Y``) rather than its advice to load with ``weights_only=False``; else
    the first sentence."""
    found = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = found.group(1) if found else text.strip().splitlines()[0]
    return line.split(". ")[0].strip()[:160]


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """``torch.load`` (weights only, on the CPU) that names the file when it cannot be read: torch's own
    errors for a cut or foreign file (``failed finding central directory``, ``pop from empty list``, a bare
    ``EOFError``, a weights-only unpickling advice) do not say which file or what to do. ``mmap``: map the
    tensors instead of reading them (a cheap check that the file reads); a file that cannot be mapped is
    read in full instead."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exn:  # noqa: BLE001 - torch raises RuntimeError, UnpicklingError, EOFError, IndexError...
        if mmap:  # not a zip archive (a legacy torch file, or garbage): torch's reason comes from a plain read
            return read_checkpoint(path)
        reason = f"torch.load raised {type(exn).__name__}" + (f": {torch_reason(str(exn))}" if str(exn).strip() else "")
        raise CheckpointError(f"{path} is not a readable unclip checkpoint (truncated, another format, or not a checkpoint): "
                              f"{reason}; retrain or recopy it, or point at another checkpoint", reason) from exn


def read_stage(path: str | Path) -> dict:
    """A stage checkpoint's contents; a readable torch file without a stage's ``state_dict`` and
    ``hyper_parameters`` (e.g. a published CLIP's plain state dict) is named as such."""
    checkpoint = read_checkpoint(path)
    if not isinstance(checkpoint, dict) or not {"state_dict", "hyper_parameters"} <= set(checkpoint):
        held = (f"keys {', '.join(repr(k) for k in list(checkpoint)[:6])}{', ...' if len(checkpoint) > 6 else ''}"
                if isinstance(checkpoint, dict) else f"a {type(checkpoint).__name__}")
        raise CheckpointError(f"{path} is a torch file but not an unclip stage checkpoint: it holds {held}, not a "
                              f"state_dict with hyper_parameters (a published CLIP .pt is given as clip.pretrained=, "
                              f"not loaded as a stage)")
    return checkpoint


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``auto``: the GPU when there is one (as Lightning's ``accelerator=auto`` picks), else the CPU."""
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve(spec: str | Path, artifacts: str | Path = "outputs/artifacts") -> Path:
    """A checkpoint path, or a published stage ``KIND[/NAME]`` (``diffusion``, ``ar``, ``decoder/shapes``)."""
    path = Path(spec)
    if path.exists():
        return path
    kind, _, name = str(spec).partition("/")
    kind = registry.canonical(kind)
    folder = Path(artifacts) / kind
    if name:
        candidate = folder / f"{name}.ckpt"
        if candidate.exists():
            return candidate
    else:
        found = sorted(folder.glob("*.ckpt"))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise FileNotFoundError(f"{folder} holds several stages ({', '.join(p.stem for p in found)}); name one as {kind}/NAME")
    raise FileNotFoundError(f"no checkpoint {spec!r}: neither a file nor a published stage under {folder}; "
                            f"train it with `python train.py model={kind}`")


def clip_from_identity(identity: dict, device="cpu", search: tuple[Path, ...] = ()):
    """Rebuilds the frozen CLIP a stage was trained with, and checks it is the same weights. A checkpoint
    records where its CLIP's weights were; when they are no longer there (the outputs folder was moved or
    copied to another machine), a file of the same name in one of the ``search`` folders is taken instead:
    the weights' sha256, not their path, says whether it is the same CLIP."""
    from unclip.clip import FrozenCLIP

    if not identity or not identity.get("model"):
        raise ValueError("the checkpoint names no CLIP (trained without a cache?); pass clip= explicitly")
    pretrained = identity.get("pretrained")
    # a weights file that is gone (a pretrained tag such as "openai" has no suffix and is left alone)
    if pretrained and Path(pretrained).suffix and not Path(pretrained).exists():
        moved = [p for p in (folder / Path(pretrained).name for folder in search) if p.exists()]
        pretrained = str(moved[0]) if moved else pretrained  # else FrozenCLIP names the missing file
    # random weights are rebuilt from their seed (older checkpoints name none: the default seed, checked below)
    clip = FrozenCLIP(identity["model"], pretrained, device=device, init_seed=identity.get("random_init_seed") or 0)
    check_clip(clip, identity)
    return clip


def same_pretrained(a: str | None, b: str | None) -> bool:
    """Two pretrained tags (``openai``) or weight files name the same weights: equal tags, or files of the
    same name (a moved file keeps its name)."""
    a, b = (str(x) if x else None for x in (a, b))
    if a is None or b is None:
        return a == b
    return a == b or (bool(Path(a).suffix) and Path(a).name == Path(b).name)


def check_clip(clip, identity: dict) -> None:
    """Refuses a CLIP other than the stage's. The weights are the identity when the stage knows their
    sha256 (the same weights under another config name, a published CLIP named after its file, are the same
    CLIP); a stage converted from published weights knows only the model name and pretrained tag
    (``ViT-L-14`` / ``openai``), which must then both match."""
    if not identity:
        return
    mine = clip.identity()
    if identity.get("sha256"):
        if mine["sha256"] != identity["sha256"]:
            raise ValueError(f"this stage was trained with CLIP {identity['model']} (weights {identity['sha256'][:12]}), "
                             f"not {mine['model']} (weights {mine['sha256'][:12]}); use the CLIP it was trained with")
        return
    if identity.get("model") and (mine["model"] != identity["model"]
                                  or not same_pretrained(mine.get("pretrained"), identity.get("pretrained"))):
        raise ValueError(f"this stage expects CLIP {identity['model']} with pretrained={identity.get('pretrained')!r}, "
                         f"not {mine['model']} with pretrained={mine.get('pretrained')!r}; use the CLIP it was made for "
                         f"(clip.model_name={identity['model']} clip.pretrained={identity.get('pretrained')})")


def load(spec: str | Path, clip=None, device: str | torch.device = "cpu", artifacts: str | Path = "outputs/artifacts",
         base: str | Path | None = None):
    """The stage's LightningModule in eval mode with its EMA weights (``kind`` picks the class). A LoRA
    checkpoint (:mod:`unclip.lora`) is its base stage with the adapter on top; ``base``: where that base is,
    when not where the adapter recorded it."""
    path = resolve(spec, artifacts)
    checkpoint = read_stage(path)
    if (checkpoint.get("hyper_parameters") or {}).get("lora"):
        return load_lora(path, checkpoint, clip=clip, device=device, artifacts=artifacts, base=base)
    return build_stage(checkpoint, path, clip=clip, device=device, artifacts=artifacts)


def build_stage(checkpoint: dict, path: Path, clip=None, device: str | torch.device = "cpu",
                artifacts: str | Path = "outputs/artifacts"):
    """The module of a stage checkpoint's contents (hyperparameters and ``state_dict``) read from ``path``."""
    hparams = checkpoint.get("hyper_parameters") or {}
    cls = registry.stage_class(hparams.get("kind"), checkpoint.get("stage_class"))  # imports a stage defined elsewhere
    if not getattr(cls, "loadable", True):
        raise ValueError(f"{path} is a {hparams.get('kind')!r} checkpoint; unclip.load opens {', '.join(registry.loadable_kinds())}")
    needs_clip = registry.plays(hparams.get("kind"), "decoder") or hparams.get("use_token_states", False)
    if needs_clip:
        # a published stage's CLIP is published beside it (ARTIFACTS/clip/NAME.pt)
        search = (path.resolve().parent.parent / "clip", Path(artifacts) / "clip")
        clip = clip_from_identity(hparams.get("clip"), device, search) if clip is None else clip
        check_clip(clip, hparams.get("clip"))
    accepted = inspect.signature(cls.__init__).parameters
    module = cls(**{k: v for k, v in hparams.items() if k in accepted and k != "clip"}, clip=clip)
    module.load_state_dict(checkpoint["state_dict"])
    module.hparams["clip"] = hparams.get("clip", {})
    module.hparams["eval"] = hparams.get("eval", {})  # the model config's evaluation settings
    module.checkpoint_path = str(path)
    return module.to(device).eval()


# ---------------------------------------------------------------------------------- LoRA checkpoints
def find_base(base: dict, adapter_path: Path, artifacts: str | Path, override: str | Path | None = None) -> Path:
    """The base stage of an adapter: ``override``, else its recorded path, its spec (a path or KIND/NAME under
    ``artifacts``), or a file of the same name beside the adapter (a folder moved whole)."""
    if override is not None:
        return resolve(override, artifacts)
    candidates = [Path(base.get("path", "")), Path(adapter_path).parent / Path(base.get("path", "")).name]
    for candidate in candidates:
        if candidate.name and candidate.is_file():
            return candidate
    try:
        return resolve(base.get("spec", ""), artifacts)
    except FileNotFoundError:
        raise FileNotFoundError(f"the base stage of LoRA adapter {adapter_path} is gone: neither {base.get('path')} nor "
                                f"{base.get('spec')!r} (under {artifacts}) exists; pass base=PATH") from None


def load_lora(path: Path, checkpoint: dict, clip=None, device="cpu", artifacts: str | Path = "outputs/artifacts",
              base: str | Path | None = None):
    """The stage of a LoRA checkpoint: built from its own hyperparameters, the base's weights loaded, the
    adapter applied on top and loaded. Refuses (:class:`BaseMismatchError`) a base of other weights."""
    from unclip.adapters import apply_lora, check_adapter_state, check_base, state_sha256  # peft: LoRA stages only

    hparams = checkpoint["hyper_parameters"]
    lora = hparams["lora"]
    base_path = find_base(lora["base"], path, artifacts, base)
    base_state = read_stage(base_path)["state_dict"]
    check_base(lora["base"], {"sha256": state_sha256(base_state)}, path, base_path)
    module = build_stage({**checkpoint, "state_dict": base_state}, base_path, clip=clip, device=device, artifacts=artifacts)
    apply_lora(module, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
    check_adapter_state(module, checkpoint["state_dict"], str(path))
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    module.hparams["lora"] = lora
    module.checkpoint_path = str(path)
    return module.to(device).eval()
