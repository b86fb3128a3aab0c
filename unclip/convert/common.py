"""What every conversion shares: the named errors, reading a published folder's configs and weights,
comparing weights with the net they must fill, the CLIP identity a converted stage records (model name +
pretrained tag: weights not at hand have no sha256), and the checkpoint ``unclip.load`` reads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from unclip import registry


class ConversionError(ValueError):
    """Published weights that cannot become a stage: a component missing from the folder, a config that
    disagrees with its weights or with the CLIP, an unknown kind. The message names what was expected."""


# ------------------------------------------------------------------------------------------ reading
def component(src: Path, *names: str, what: str) -> Path:
    """The first of ``names`` present under ``src`` (a published folder's sub-folder or file)."""
    for name in names:
        if (src / name).exists():
            return src / name
    raise ConversionError(f"{src} has no {' or '.join(n + '/' if '.' not in n else n for n in names)} ({what}); "
                          f"expected the published layout (see README, 'Published weights')")


def read_json(path: Path) -> dict:
    if not path.exists():
        raise ConversionError(f"{path.parent} has no {path.name}; expected the published config beside the weights")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); recopy it from the published release") from error


WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors",
                "pytorch_model.bin")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors or torch file (weights only), or from a diffusers folder's weights file."""
    if path.is_dir():
        path = component(path, *WEIGHT_FILES, what="the weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - safetensors and torch raise their own kinds
        raise ConversionError(f"{path} does not read as weights ({type(error).__name__}: {str(error)[:160]}); "
                              f"recopy it from the published release") from error
    return state.get("state_dict", state) if isinstance(state, dict) else state


def load_matching(net: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fills ``net`` from ``state``, refusing missing, unexpected or differently shaped tensors by name
    (the config beside the weights must describe them)."""
    mine = net.state_dict()
    missing = sorted(set(mine) - set(state))
    unexpected = sorted(set(state) - set(mine))
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(mine[k].shape)}" for k in set(mine) & set(state)
                    if tuple(state[k].shape) != tuple(mine[k].shape))
    if missing or unexpected or shapes:
        def few(items):
            return ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "") or "none"
        raise ConversionError(f"the weights of {source} do not match its config: missing {few(missing)}; unexpected "
                              f"{few(unexpected)}; shapes (weights vs config) {few(shapes)}. The config.json beside the "
                              f"weights must be the one they were saved with")
    net.load_state_dict({k: v.float() for k, v in state.items()})


# --------------------------------------------------------------------------------------------- CLIP
def clip_identity(options: dict, model: str, pretrained: str | None) -> dict:
    """The CLIP a converted stage expects: its published one unless ``clip_model=``/``clip_pretrained=`` say
    otherwise (``none``: random weights from ``clip_init_seed``, the tests' tiny CLIPs). No sha256: the weights
    are not at hand, so ``unclip.loading.check_clip`` compares model and pretrained tag."""
    import open_clip

    import unclip.clip  # noqa: F401  (registers the project's CLIP configs with open_clip)

    model = options.get("clip_model", model)
    pretrained = options.get("clip_pretrained", pretrained)
    pretrained = None if str(pretrained).lower() in ("none", "null", "") else pretrained
    config = open_clip.get_model_config(model)
    if config is None:
        raise ConversionError(f"clip_model={model} is not an open_clip model name (e.g. ViT-L-14, ViT-bigG-14)")
    text = config.get("text_cfg", {})
    return {"model": model, "pretrained": pretrained, "sha256": None, "dim": int(config["embed_dim"]),
            "text_width": int(text.get("width", 512)), "context_length": int(text.get("context_length", 77)),
            "random_init_seed": None if pretrained else int(options.get("clip_init_seed", 0))}


# ------------------------------------------------------------------------------------------ writing
def stage_checkpoint(module, identity: dict, eval_block: dict) -> dict:
    """What ``unclip.load`` reads: the module's weights, its hyperparameters with the CLIP identity and its
    evaluation settings, and the class's import path."""
    hparams = dict(module.hparams)
    hparams["clip"] = {k: v for k, v in identity.items() if k not in ("text_width", "context_length")}
    hparams["eval"] = eval_block
    return {"state_dict": {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
            "hyper_parameters": hparams, "stage_class": registry.qualified_name(type(module))}
