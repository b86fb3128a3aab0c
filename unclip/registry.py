"""The registry of stage kinds: every LightningModule that names its own ``kind`` registers itself here
when its class is created (``UnclipModule.__init_subclass__``), so loading, the pipeline, evaluation, plots
and the demo find a stage by its kind without a table to keep in step.

A new prior is a net file, a module file and a model config: the module class sets ``kind`` (and, if it
likes, ``aliases`` and ``colormap``); its checkpoints record the class's import path, so ``unclip.load``
imports it even where nothing else did. The built-in stages register when ``unclip.modules`` is imported
(it imports each of its modules); the registry itself imports nothing of unclip, so it sits below
everything that uses it.
"""

from __future__ import annotations

import importlib

STAGES: dict[str, type] = {}
ALIASES: dict[str, str] = {}  # short names on the command line: ``prior=diffusion``


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register(cls: type) -> type:
    """Adds a stage class under its ``kind`` (and its ``aliases``). The same class imported again (a module
    reloaded, or run as ``__main__`` and imported) replaces itself; two classes claiming a kind are refused."""
    kind = cls.kind
    known = STAGES.get(kind)
    if known is not None and known.__qualname__ != cls.__qualname__:
        raise ValueError(f"stage kind {kind!r} is claimed by {qualified_name(known)} and by {qualified_name(cls)}; "
                         f"give one of them another kind")
    STAGES[kind] = cls
    for alias in getattr(cls, "aliases", ()):
        if ALIASES.get(alias, kind) != kind:
            raise ValueError(f"alias {alias!r} of {kind} already names stage kind {ALIASES[alias]!r}")
        ALIASES[alias] = kind
    return cls


def canonical(name: str) -> str:
    """A kind from a kind or an alias (``diffusion`` -> ``diffusion_prior``); other names pass through."""
    return ALIASES.get(name, name)


def stage_class(kind: str, class_path: str | None = None) -> type:
    """The class of a stage kind. ``class_path`` (``package.module.Class``, recorded in checkpoints) is
    imported when the kind is not registered yet: a stage defined outside unclip loads without a plugin list."""
    if kind not in STAGES and class_path:
        module_name, _, _ = class_path.rpartition(".")
        try:
            importlib.import_module(module_name)
        except ImportError as error:
            raise ValueError(f"stage kind {kind!r} is defined in {class_path}, which cannot be imported ({error}); "
                             f"install or put on PYTHONPATH the package that defines it") from error
    if kind not in STAGES:
        raise ValueError(f"unknown stage kind {kind!r}; registered kinds: {', '.join(sorted(STAGES))}. A stage of your "
                         f"own registers when the module defining its class is imported")
    return STAGES[kind]


def is_prior(kind: str) -> bool:
    """Whether the kind is a prior p(z_i | caption) (its class derives from ``PriorModule``)."""
    return bool(getattr(STAGES.get(kind), "is_prior", False))


def plays(kind: str, role: str) -> bool:
    """Whether stages of ``kind`` can stand where a ``role`` stage is asked for (``decoder``, ``upsampler``): the
    role's own kind, or a class derived from it (a published decoder is a decoder with another net)."""
    cls, base = STAGES.get(kind), STAGES.get(role)
    return kind == role or (cls is not None and base is not None and issubclass(cls, base))


def prior_kinds() -> list[str]:
    return sorted(k for k in STAGES if is_prior(k))


def loadable_kinds() -> list[str]:
    """Kinds that ``unclip.load`` opens (CLIP pretraining publishes a plain open_clip state dict instead)."""
    return sorted(k for k, cls in STAGES.items() if getattr(cls, "loadable", True))


def prior_names() -> str:
    """``diffusion|ar|contrastive``: what ``prior=`` takes, for messages."""
    short = {kind: alias for alias, kind in ALIASES.items()}
    return "|".join(short.get(k, k) for k in prior_kinds())


PALETTE = ("Purples", "Reds", "Greys", "YlOrBr", "PuRd", "BuGn")


def colormap(kind: str) -> str:
    """A matplotlib colormap per kind, the class's own ``colormap`` when it names one, so each prior keeps
    its hue across plots."""
    cls = STAGES.get(kind)
    if cls is not None and getattr(cls, "colormap", None):
        return cls.colormap
    return PALETTE[sum(map(ord, kind)) % len(PALETTE)]
