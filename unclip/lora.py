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

import logging
import sys
from pathlib import Path

from unclip import registry
from unclip.adapters import BaseMismatchError, apply_lora, check_base, merge, state_sha256, target_patterns

log = logging.getLogger(__name__)
__all__ = ["BaseMismatchError", "apply_lora", "merge", "merge_file", "main", "start", "state_sha256"]
USAGE = "usage: python -m unclip.lora merge src=LORA.ckpt out=PLAIN.ckpt [base=BASE.ckpt] [artifacts=DIR]"


# ------------------------------------------------------------------------------------------- injecting
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


# ---------------------------------------------------------------------------------------- checkpoints
# -------------------------------------------------------------------------------------------- loading
# -------------------------------------------------------------------------------------------- merging
def merge_file(src: str | Path, out: str | Path, base: str | Path | None = None,
               artifacts: str | Path = "outputs/artifacts") -> Path:
    """Writes the plain stage of a LoRA checkpoint: the merged weights, its hyperparameters without ``lora``
    (``merged_from`` names the adapter and its base, for information)."""
    from unclip.atomic import atomic_torch_save
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
