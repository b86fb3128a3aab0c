"""Sampling settings of evaluation: labels, normalisation, and a prior kind's sweep, settings list and
image setting, read from the ``eval:`` block its model config wrote into its checkpoint (overridable per
kind from the command line, ``eval.<kind>.sweep.steps=[8,16]``)."""

from __future__ import annotations

import itertools

from omegaconf import OmegaConf


def label(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items()) or "default"


def normalise_setting(setting: dict) -> dict:
    """Guidance scales as floats and step counts as ints, so 4 and 4.0 name one setting."""
    out = dict(setting)
    if out.get("guidance_scale") is not None:
        out["guidance_scale"] = float(out["guidance_scale"])
    if isinstance(out.get("steps"), (int, float)):
        out["steps"] = int(out["steps"])
    return out


def sweep_settings(knobs: dict | None) -> list[dict]:
    """Every combination of the swept values (``eval.sweep``: knob -> list); no knobs: the default setting."""
    knobs = dict(knobs or {})
    names = list(knobs)
    grid = [normalise_setting(dict(zip(names, values))) for values in itertools.product(*(list(knobs[k]) for k in names))]
    return grid or [{}]


def plain(node):
    """A config node as plain dicts and lists (anything else as it is)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def settings_of(node) -> dict:
    """A settings mapping from the config without its null entries (null: the stage's own default)."""
    return normalise_setting({k: v for k, v in (plain(node) or {}).items() if v is not None})


EVAL_KEYS = ("settings", "sweep", "image_setting")


def eval_settings(prior, cfg) -> dict:
    """A prior's ``eval`` block: ``settings`` (a list, mode=prior|compare), ``sweep`` (knob -> values,
    mode=leaderboard) and ``image_setting`` (the one decoded for image metrics). It comes from the model
    config through the checkpoint; ``cfg.eval.<kind>`` replaces entries of it; what neither names is the
    prior's own default setting."""
    block = dict((getattr(prior, "hparams", None) or {}).get("eval") or {})
    block.update(plain((cfg.get("eval") or {}).get(prior.kind)) or {})
    unknown = set(block) - set(EVAL_KEYS)
    if unknown:
        raise ValueError(f"unknown eval entries {sorted(unknown)} for prior {prior.kind}; known: {', '.join(EVAL_KEYS)}")
    return {"settings": [normalise_setting(s) for s in block.get("settings") or [{}]],
            "sweep": dict(block.get("sweep") or {}),
            "image_setting": settings_of(block.get("image_setting"))}
