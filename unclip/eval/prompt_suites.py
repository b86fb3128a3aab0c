"""The versioned prompt suite for the shapes data: prompts with the attributes they ask for, so generated
images can be scored object by object and results stay comparable across runs.

    python -m unclip.eval.prompt_suites [version=v1] [out=conf/prompt_suites/shapes_v1.yaml]

Each entry is ``{prompt, objects: [{shape, color, size?, position?}], tags}`` with labels in
:data:`unclip.data.shapes.VOCAB`'s canonical names; variant entries also carry ``phrasing``, the wording
they introduce. Tags:

- ``single`` / ``two``: one or two objects; canonical words, in training's own caption templates or as
  the bare "a red circle";
- ``variant``: templates and synonyms that the training captions never use ("a photo of", "teal",
  "centre"), to see whether a prior generalises beyond the caption grammar it was trained on;
- ``holdout``: an object is a held-out [shape, colour] pair (``shapes.DEFAULT_HOLDOUT``), a composition
  no training image shows.

The suite is a pure function of the version and the vocabulary: rerunning the module rewrites the same
file, and a test checks that the file on disk is what :func:`build_suite` returns.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Sequence

import yaml

from unclip.data.shapes import COLORS, DEFAULT_HOLDOUT, POSITIONS, SHAPES, SIZES, VOCAB, caption_for, with_articles

# not conf/prompts/: Hydra would read that as a config group and shadow `sample.py prompts=[...]`
SUITE_DIR = Path(__file__).resolve().parents[2] / "conf" / "prompt_suites"
VERSIONS = ("v1",)

# Wordings that training captions never use (tests/test_prompts.py checks them against sampled captions).
# One template per line: the template, then the phrase that makes it new.
VARIANT_TEMPLATES = [
    ("a photo of {a} {color} {shape}", "a photo of"),
    ("there is {a} {color} {shape} in the {position}", "there is"),
    ("{a} {shape} coloured {color}", "coloured"),
    ("{a} {size} {shape} in {color}, placed at the {position}", "placed at"),
    ("{a} {color} {shape} on a plain background", "on a plain background"),
    ("one {size} {color} {shape}, nothing else", "nothing else"),
    ("{a} {shape} that is {color}", "that is"),
    ("{a} single {color} {shape} near the {position}", "near the"),
]
VARIANT_PAIR_TEMPLATES = [
    ("{obj1} beside {obj2}", "beside"),
    ("{obj1} together with {obj2}", "together with"),
    ("both {obj1} and {obj2}", "both"),
]
VARIANT_WORDS = {
    "shape": {"circle": "round shape", "square": "tile", "triangle": "three-sided shape", "star": "pentagram",
              "hexagon": "six-cornered shape", "diamond": "diamond shape"},
    "color": {"red": "ruby", "orange": "amber", "yellow": "canary", "green": "jade", "cyan": "teal",
              "blue": "cobalt", "purple": "amethyst", "pink": "fuchsia"},
    "size": {"small": "miniature", "medium": "average-sized", "large": "giant"},
    # positions with their preposition: they replace training's "in the {position}"
    "position": {"top left": "in the top-left corner", "top": "at the top edge", "top right": "in the top-right corner",
                 "left": "on the left side", "center": "in the centre", "right": "on the right side",
                 "bottom left": "in the bottom-left corner", "bottom": "at the bottom edge",
                 "bottom right": "in the bottom-right corner"},
}
ATTRIBUTES = ("shape", "color", "size", "position")
CANONICAL = {  # canonical word of each attribute value: the first synonym
    "shape": {k: v[0] for k, v in SHAPES.items()},
    "color": {k: v[-1][0] for k, v in COLORS.items()},
    "size": {k: v[-1][0] for k, v in SIZES.items()},
    "position": {k: v[-1][0] for k, v in POSITIONS.items()},
}
VOCAB_VALUES = {"shape": VOCAB.shapes, "color": VOCAB.colors, "size": VOCAB.sizes, "position": VOCAB.positions}

# how many entries of each kind v1 holds
N_HOLDOUT_EXTRA = 3      # extra sized and placed single prompts per held-out pair
N_TWO = 40               # two-object scenes in training's pair templates (each held-out pair in 2 of them)
N_ALL_NEW_WORDS = 8      # single prompts whose four words are all variants
N_TWO_VARIANTS = 4       # per variant pair template


def suite_path(version: str = "v1") -> Path:
    return SUITE_DIR / f"shapes_{version}.yaml"


def full_object(shape: str, color: str, rng: random.Random, position: str | None = None) -> dict:
    return {"shape": shape, "color": color, "size": rng.choice(VOCAB.sizes), "position": position or rng.choice(VOCAB.positions)}


def fill(template: str, obj: dict, words: dict | None = None) -> str:
    """The template with the object's words (canonical unless ``words`` names a replacement)."""
    words = words or {}
    text = template.format(a="{a}", **{k: words.get(k, CANONICAL[k][obj[k]]) for k in ATTRIBUTES if k in obj})
    return with_articles(text)


def object_phrase(obj: dict, words: dict | None = None) -> str:
    """"a small red circle in the top left" (training's object phrase), some words replaced by ``words``."""
    words = dict(words or {})
    where = words.pop("position", None) or f"in the {CANONICAL['position'][obj['position']]}"
    return fill("{a} {size} {color} {shape} " + where, obj, words)


def entry(prompt: str, objects: list[dict], holdout: set, variant: list[str] | None = None) -> dict:
    tags = ["single" if len(objects) == 1 else "two"]
    if variant:
        tags.append("variant")
    if any((o["shape"], o["color"]) in holdout for o in objects):
        tags.append("holdout")
    out = {"prompt": prompt, "objects": objects, "tags": tags}
    if variant:
        out["phrasing"] = variant
    return out


def two_objects(rng: random.Random, first: tuple[str, str] | None, holdout: set) -> list[dict]:
    """Two objects in distinct cells; the first is ``first`` when given, the rest seen compositions."""
    seen = [(s, c) for s in VOCAB.shapes for c in VOCAB.colors if (s, c) not in holdout]
    pairs = [first or rng.choice(seen), rng.choice(seen)]
    positions = rng.sample(VOCAB.positions, 2)
    return [full_object(s, c, rng, p) for (s, c), p in zip(pairs, positions)]


def build_suite(version: str = "v1", holdout=DEFAULT_HOLDOUT) -> list[dict]:
    """The suite's entries, deterministic for (version, vocabulary, holdout)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown prompt suite version {version!r}; known: {', '.join(VERSIONS)}")
    rng = random.Random(f"shapes-prompts-{version}")
    holdout = {tuple(p) for p in holdout}
    combos = [(s, c) for s in VOCAB.shapes for c in VOCAB.colors]
    entries = []
    # single objects: every [shape, colour], bare and then sized and placed (training's template 0)
    entries += [entry(fill("{a} {color} {shape}", {"shape": s, "color": c}), [{"shape": s, "color": c}], holdout)
                for s, c in combos]
    placements = [(size, position) for size in VOCAB.sizes for position in VOCAB.positions]
    for s, c in combos:  # held-out pairs more often, each time in another place
        for size, position in rng.sample(placements, 1 + (N_HOLDOUT_EXTRA if (s, c) in holdout else 0)):
            obj = {"shape": s, "color": c, "size": size, "position": position}
            entries.append(entry(caption_for([obj], 0, rng, synonyms=False), [obj], holdout))
    # two-object scenes in training's pair templates, each held-out pair twice
    firsts = [p for p in sorted(holdout) for _ in range(2)]
    firsts += [None] * (N_TWO - len(firsts))
    for index, first in enumerate(firsts):
        objects = two_objects(rng, first, holdout)
        entries.append(entry(caption_for(objects, index % 2, rng, synonyms=False), objects, holdout))
    # variant templates: every [shape, colour] once over all templates
    order = rng.sample(combos, len(combos))
    for index, (s, c) in enumerate(order):
        template, phrase = VARIANT_TEMPLATES[index % len(VARIANT_TEMPLATES)]
        obj = full_object(s, c, rng)
        used = {k: obj[k] for k in ATTRIBUTES if "{" + k + "}" in template}
        entries.append(entry(fill(template, used), [used], holdout, [phrase]))
    # variant words in training's template 0: each new word once, then all four words new at once
    for attribute, table in VARIANT_WORDS.items():
        for value, word in table.items():
            obj = {**full_object(*rng.choice(combos), rng), attribute: value}
            entries.append(entry(object_phrase(obj, {attribute: word}), [obj], holdout, [word]))
    for s, c in rng.sample(combos, N_ALL_NEW_WORDS):
        obj = full_object(s, c, rng)
        words = {k: VARIANT_WORDS[k][obj[k]] for k in ATTRIBUTES}
        entries.append(entry(object_phrase(obj, words), [obj], holdout, list(words.values())))
    # variant pair templates
    for template, phrase in VARIANT_PAIR_TEMPLATES:
        for _ in range(N_TWO_VARIANTS):
            objects = two_objects(rng, None, holdout)
            prompt = template.format(obj1=object_phrase(objects[0]), obj2=object_phrase(objects[1]))
            entries.append(entry(prompt, objects, holdout, [phrase]))
    return entries


def write_suite(version: str = "v1", out: str | Path | None = None) -> Path:
    path = Path(out) if out else suite_path(version)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"version": version, "holdout": [list(p) for p in DEFAULT_HOLDOUT], "prompts": build_suite(version)}
    header = (f"# The shapes prompt suite {version}: {len(document['prompts'])} prompts with their attribute labels.\n"
              f"# Generated by `python -m unclip.eval.prompt_suites version={version}`; do not edit by hand.\n")
    path.write_text(header + yaml.safe_dump(document, sort_keys=False, default_flow_style=None, width=160, allow_unicode=True))
    return path


def load_suite(version: str = "v1", path: str | Path | None = None) -> list[dict]:
    """The entries of a written suite (``conf/prompt_suites/shapes_VERSION.yaml`` unless ``path`` is given)."""
    if path is None and version not in VERSIONS:
        raise ValueError(f"unknown prompt suite version {version!r}; known: {', '.join(VERSIONS)}")
    path = Path(path) if path else suite_path(version)
    if not path.exists():
        raise FileNotFoundError(f"no prompt suite at {path}; write it with `python -m unclip.eval.prompt_suites version={version}`")
    document = yaml.safe_load(path.read_text())
    if not isinstance(document, dict) or not isinstance(document.get("prompts"), list):
        raise ValueError(f"{path} is not a prompt suite (a mapping with a 'prompts' list)")
    return document["prompts"]


def evenly(items: Sequence, k: int) -> list:
    """``k`` items spread evenly over ``items`` (the first included)."""
    return [items[(j * len(items)) // k] for j in range(k)] if k else []


def spread_subset(entries: list[dict], limit: int) -> list[dict]:
    """``limit`` suite entries spread over the suite, in suite order. Held-out (unseen) entries are taken
    in proportion, but at least one when there are any and ``limit`` >= 2, so a small subset still has
    both splits."""
    if limit < 1:
        raise ValueError(f"suite_limit must be a positive number of prompts or null (all), got {limit}")
    unseen = [i for i, e in enumerate(entries) if "holdout" in e["tags"]]
    seen = [i for i, e in enumerate(entries) if "holdout" not in e["tags"]]
    k_unseen = min(len(unseen), round(limit * len(unseen) / max(len(entries), 1)))
    if unseen and limit >= 2:
        k_unseen = max(1, k_unseen)
    k_seen = min(len(seen), limit - k_unseen)
    return [entries[i] for i in sorted(evenly(seen, k_seen) + evenly(unseen, k_unseen))]


def suite_entries(version: str, limit: int | None) -> list[dict]:
    entries = load_suite(version)
    return entries if limit is None or limit >= len(entries) else spread_subset(entries, int(limit))


def repeat(entries: list[dict], key: str, n: int) -> list:
    """Each entry's ``key``, n times in a row: the layout of n samples per prompt."""
    return [e[key] for e in entries for _ in range(n)]


def main(argv: list[str] | None = None) -> None:
    args = dict(arg.partition("=")[::2] for arg in (sys.argv[1:] if argv is None else argv))
    unknown = set(args) - {"version", "out"}
    if unknown:
        raise SystemExit(f"unclip.eval.prompt_suites: unknown argument(s) {sorted(unknown)}; expected version=... out=...")
    path = write_suite(args.get("version", "v1"), args.get("out"))
    print(f"wrote {len(load_suite(path=path))} prompts to {path}")


if __name__ == "__main__":
    main()
