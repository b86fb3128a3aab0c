"""LoRA adapters on a stage's net through peft (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x, W0 frozen):
injecting them, the base's identity, the adapter-only checkpoint state, and merging. Training
(:mod:`unclip.lora`) and loading (:mod:`unclip.loading`) both use it; it imports neither."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class BaseMismatchError(ValueError):
    """A LoRA adapter offered a base stage other than the one it was trained on."""


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names and tensor bytes (as a CLIP's identity): paths are not part of it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def target_patterns(kind: str, targets: list[str] | None, default_targets: dict | None) -> list[str]:
    """The module-name patterns of a run: ``finetune.targets``, else the stage kind's defaults."""
    patterns = list(targets) if targets else list((default_targets or {}).get(kind) or [])
    if not patterns:
        raise ValueError(f"finetune=lora has no default targets for a {kind} stage (defaults exist for "
                         f"{', '.join(sorted(default_targets or {}))}); set finetune.targets=['REGEX', ...] "
                         f"(regexes matched against module names inside model.net)")
    return patterns


def apply_lora(module, rank: int, alpha: float, dropout: float, targets: list[str]) -> list[str]:
    """Injects LoRA layers into ``module.net`` (in place: the net keeps its class and methods) at the modules
    whose full name inside the net matches one of ``targets`` (regexes), and freezes everything but them.
    Returns the adapted module names."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError as error:
        raise ImportError("finetune=lora and LoRA checkpoints need peft: pip install -e '.[finetune]'") from error
    if int(rank) < 1:
        raise ValueError(f"finetune.rank must be a positive integer, got {rank}")
    pattern = "|".join(f"(?:{p})" for p in targets)  # peft full-matches one regex against each module name
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=pattern,
                        bias="none")
    module.requires_grad_(False)
    try:
        inject_adapter_in_model(config, module.net)
    except ValueError as error:
        if "not found in the base model" not in str(error):
            raise
        layers = [n for n, m in module.net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d))]
        raise ValueError(f"finetune.targets {targets} match no layer of the {module.kind} net; its Linear/Conv layers are "
                         f"named e.g. {', '.join(layers[:8])}{', ...' if len(layers) > 8 else ''}") from error
    adapted = [n for n, m in module.net.named_modules() if isinstance(m, BaseTunerLayer)]
    # only the adapter trains; a non-strict load lets a checkpoint hold the adapter alone (checked by check_adapter_state)
    module.strict_loading = False
    return adapted


def adapter_keys(module) -> set[str]:
    """The state-dict names of what trains in a LoRA run: the adapter's parameters."""
    return {name for name, p in module.named_parameters() if p.requires_grad}


def check_base(expected: dict, found: dict, adapter: str | Path, base_path: str | Path) -> None:
    if expected.get("sha256") and expected["sha256"] != found["sha256"]:
        raise BaseMismatchError(f"the LoRA adapter {adapter} was trained on the {expected.get('kind')} stage "
                                f"{expected.get('path')} (weights sha256 {expected['sha256'][:12]}), but {base_path} holds "
                                f"other weights (sha256 {found['sha256'][:12]}); give it the base it was trained on "
                                f"(unclip.load(..., base=PATH), merge base=PATH, or init_from=PATH on resume)")


def keep_adapter(module, checkpoint: dict) -> None:
    """A LoRA run's checkpoint keeps only the adapter's tensors (EMA and raw alike): the base is named by
    its identity in ``hyper_parameters['lora']``, not copied."""
    keys = adapter_keys(module)
    for field in ("state_dict", "current_model_state"):
        if field in checkpoint:
            checkpoint[field] = {k: v for k, v in checkpoint[field].items() if k in keys}


def check_adapter_state(module, state: dict, source: str = "the checkpoint") -> None:
    """Refuses a state that is not exactly this run's adapter (another rank or targets, or a full stage)."""
    keys = adapter_keys(module)
    missing, unexpected = sorted(keys - set(state)), sorted(set(state) - keys)
    if missing or unexpected:
        raise ValueError(f"{source} does not hold this LoRA run's adapter: missing {missing[:6] or 'none'}, unexpected "
                         f"{unexpected[:6] or 'none'} (a different finetune.rank/targets, or not a LoRA checkpoint)")
    shapes = [k for k in keys if tuple(state[k].shape) != tuple(module.state_dict()[k].shape)]
    if shapes:
        raise ValueError(f"{source}: adapter tensors of another shape (another finetune.rank?): {sorted(shapes)[:6]}")


@torch.no_grad()
def merge(module):
    """Folds each adapter into its base layer (peft's ``merge``: W = W0 + (alpha / r) B A) and puts the plain
    layer back in its place, so the net's names and classes are the base's again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in [(n, m) for n, m in module.net.named_modules() if isinstance(m, BaseTunerLayer)]:
        layer.merge()
        parent, _, leaf = name.rpartition(".")
        setattr(module.net.get_submodule(parent) if parent else module.net, leaf, layer.get_base_layer())
    module.hparams.pop("lora", None)
    module.strict_loading = True
    return module
