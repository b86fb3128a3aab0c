"""What a caption or a KEY.json names, as the objects the attribute classifier's scoring asks for."""

from __future__ import annotations

import re

from unclip.data.shapes import COLORS, PAIR_TEMPLATES, POSITIONS, SHAPES, SIZES, TEMPLATES


def named_objects(meta: dict) -> list[dict]:
    """The objects of a KEY.json as its caption names them: single-object templates may leave out the
    size (``"a red circle in the top left"``) or the position (``"a small red circle"``); those keys are
    dropped here, so scoring a generated image against its prompt asks only for what the prompt said.
    (The full ``meta["objects"]`` describes the image itself: use it to score reconstructions.)"""
    objects = meta.get("objects", [])
    if len(objects) != 1:  # pair templates name shape, colour, size and position of both objects
        template = "{size} {color} {shape} in the {position}"
    else:
        template = TEMPLATES[int(meta.get("template", 0))]
    return [{k: obj[k] for k in ("shape", "color", "size", "position") if "{" + k + "}" in template} for obj in objects]


def _phrase_pattern(table: dict) -> tuple[re.Pattern, dict[str, str]]:
    words = {w: name for name, value in table.items() for w in (value[-1] if isinstance(value, tuple) else value)}
    alternatives = sorted(words, key=len, reverse=True)  # longest first: "top left" before "top"
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in alternatives) + r")\b"), words


_PATTERNS = {key: _phrase_pattern(table) for key, table in
             (("shape", SHAPES), ("color", COLORS), ("size", SIZES), ("position", POSITIONS))}
_PAIR_SPLIT = re.compile("|".join(re.escape(t.replace("{obj1}", "").replace("{obj2}", "")) for t in PAIR_TEMPLATES))


def named_value(attribute: str, text: str) -> str | None:
    """The canonical value of ``attribute`` (shape, color, size, position) that ``text`` names first, in any synonym
    (``named_value("position", "a disc in the upper left")`` -> ``"top left"``), or None."""
    pattern, words = _PATTERNS[attribute]
    found = pattern.search(text.lower())
    return words[found.group(1)] if found else None


def objects_from_caption(caption: str) -> list[dict]:
    """Parses a shapes-style caption or prompt (any template, any synonym) into prompt labels: one dict
    per object with the attributes the text names (``"a large blue square"`` -> ``[{shape, color, size}]``).
    An object phrase without a shape or a colour cannot be scored and raises ValueError."""
    objects = []
    for phrase in _PAIR_SPLIT.split(caption.lower()):
        obj = {key: value for key in _PATTERNS if (value := named_value(key, phrase)) is not None}
        if "shape" not in obj or "color" not in obj:
            raise ValueError(f"cannot score {phrase.strip()!r} of prompt {caption!r}: it names no shape and colour of "
                             f"unclip.data.shapes.VOCAB")
        objects.append(obj)
    return objects
