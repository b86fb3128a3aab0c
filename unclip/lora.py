"""LoRA fine-tuning of a stage's net through peft (Hu et al. 2021, eq. 3: h = W0 x + (alpha / r) B A x, with W0
frozen and only A (r x in) and B (out x r, zero at the start) trained).

``train.py finetune=lora init_from=BASE`` injects peft's LoRA layers into the modules of ``module.net`` whose
names match ``finetune.targets``, freezes everything else, and trains the adapter; the EMA follows the
adapter only (the frozen base is shared with the average, :mod:`unclip.modules.ema`). A LoRA checkpoint
(``last.ckpt`` and the published stage alike) holds only the adapter's tensors; its ``hyper_parameters``
are the run's, plus ``lora``: rank, alpha, dropout, the target patterns and ``base`` (the base stage's
path as given and resolved, its kind, and ``sha256`` over its sorted state-dict names and tensor bytes, so
moving or re-saving the base keeps its identity). ``unclip.load`` of a LoRA checkpoint builds the stage from
the base's weights, applies the adapter on top, and refuses a base whose sha256 differs.

``python -m unclip.lora merge src=LORA.ckpt out=PLAIN.ckpt`` folds the adapter into the base weights
(W = W0 + (alpha / r) B A) and writes a plain stage, which opens without peft.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import torch

from unclip import registry

log = logging.getLogger(__name__)
USAGE = "usage: python -m unclip.lora merge src=LORA.ckpt out=PLAIN.ckpt [base=BASE.ckpt] [artifacts=DIR]"


class BaseMismatchError(ValueError):
    """A LoRA adapter offered a base stage other than the one it was trained on."""


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the sorted names and tensor bytes (as a CLIP's identity): paths are not part of it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- injecting
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


def start(module, finetune: dict, spec: str | None, base_path: Path | None, base_state: dict | None,
          resumed: str | None = None) -> None:
    """Turns a module holding its base's weights into a LoRA run: adapter injected, hyperparameters naming
    the base. On resume, refuses a base other than the one the run's checkpoint was trained on."""
    if not spec or base_state is None:
        raise ValueError("finetune=lora adapts a trained stage: pass init_from=PATH (a stage written by "
                         "`python -m unclip.convert` or by training)")
    targets = target_patterns(module.kind, finetune.get("targets"), finetune.get("default_targets"))
    adapted = apply_lora(module, finetune["rank"], finetune["alpha"], finetune.get("dropout", 0.0), targets)
    base = {"spec": str(spec), "path": str(Path(base_path).resolve()), "kind": module.kind, "sha256": state_sha256(base_state)}
    module.hparams["lora"] = {"rank": int(finetune["rank"]), "alpha": float(finetune["alpha"]),
                              "dropout": float(finetune.get("dropout", 0.0)), "targets": targets, "base": base}
    if getattr(module, "is_prior", False):
        # the adapter learns in the base's normalised space: a cache's stats never replace the base's
        module.keeps_stats = True
    if resumed and Path(resumed).is_file():
        from unclip.loading import read_checkpoint

        stored = ((read_checkpoint(resumed, mmap=True).get("hyper_parameters") or {}).get("lora") or {}).get("base") or {}
        check_base(stored, base, resumed, base_path)
    trained = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info("LoRA rank %s on %d layers of the %s net: %d trainable parameters of %d", finetune["rank"], len(adapted),
             module.kind, trained, sum(p.numel() for p in module.parameters()))


def check_base(expected: dict, found: dict, adapter: str | Path, base_path: str | Path) -> None:
    if expected.get("sha256") and expected["sha256"] != found["sha256"]:
        raise BaseMismatchError(f"the LoRA adapter {adapter} was trained on the {expected.get('kind')} stage "
                                f"{expected.get('path')} (weights sha256 {expected['sha256'][:12]}), but {base_path} holds "
                                f"other weights (sha256 {found['sha256'][:12]}); give it the base it was trained on "
                                f"(unclip.load(..., base=PATH), merge base=PATH, or init_from=PATH on resume)")


# ---------------------------------------------------------------------------------------- checkpoints
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


# -------------------------------------------------------------------------------------------- loading
def find_base(base: dict, adapter_path: Path, artifacts: str | Path, override: str | Path | None = None) -> Path:
    """The base stage of an adapter: ``override``, else its recorded path, its spec (a path or KIND/NAME under
    ``artifacts``), or a file of the same name beside the adapter (a folder moved whole)."""
    from unclip.loading import resolve

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
    from unclip.loading import build_stage, read_stage

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


# -------------------------------------------------------------------------------------------- merging
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


def merge_file(src: str | Path, out: str | Path, base: str | Path | None = None,
               artifacts: str | Path = "outputs/artifacts") -> Path:
    """Writes the plain stage of a LoRA checkpoint: the merged weights, its hyperparameters without ``lora``
    (``merged_from`` names the adapter and its base, for information)."""
    from unclip.checkpoints import atomic_torch_save
    from unclip.loading import load, read_stage, resolve

    src_path = resolve(src, artifacts)
    hparams = read_stage(src_path)["hyper_parameters"]
    if not hparams.get("lora"):
        raise ValueError(f"{src_path} is not a LoRA checkpoint (no hyper_parameters['lora']): it is a plain stage already")
    module = merge(load(src_path, artifacts=artifacts, base=base))
    merged = {**dict(module.hparams), "merged_from": {"adapter": str(src_path.resolve()), "base": hparams["lora"]["base"]}}
    merged.pop("lora", None)
    checkpoint = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()},
                  "hyper_parameters": merged, "stage_class": registry.qualified_name(type(module))}
    atomic_torch_save(checkpoint, out)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "merge":
        raise SystemExit(f"unclip.lora: unknown command {args[:1]}; {USAGE}")
    pairs = args[1:]
    bad = [a for a in pairs if "=" not in a]
    options = dict(a.split("=", 1) for a in pairs if "=" in a)
    unknown = sorted(set(options) - {"src", "out", "base", "artifacts"})
    if bad or unknown or not {"src", "out"} <= set(options):
        raise SystemExit(f"unclip.lora: bad arguments {bad + unknown or pairs}; {USAGE}")
    path = merge_file(options["src"], options["out"], options.get("base"), options.get("artifacts", "outputs/artifacts"))
    print(f"wrote {path} (the adapter {options['src']} merged into its base)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(f"unclip.lora: {error}") from error
