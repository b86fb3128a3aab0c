"""Prompt completion: what a prompt leaves open is drawn before sampling, instead of left to the prior.

A caption that names no position ("a red circle") stands for images with the circle in any one cell. Asked for
it, a small prior returns a z_i between those modes, and the decoder draws it as two blobs or one smeared one.
Drawing the open attribute first samples the same mixture one mode at a time,
p(x | y) = Σ_a p(a | y) p(x | y, a), with p(a | y) the attribute's distribution in the training captions.
This is DALL-E 3's caption upsampling (Betker et al. 2023) and LMD's layout planning (Lian et al. 2023) in
the one world whose attributes the project knows: the shapes data, where size and cell are drawn uniformly
(``unclip.data.shapes.sample_objects``). A prompt that names them, or names several objects, is left as it is.
"""

from __future__ import annotations

import random
import re
from typing import Callable

from unclip.composition import named_cell, object_phrases
from unclip.data.shapes import POSITIONS, SIZES, with_articles
from unclip.eval.attributes.captions import named_value

Completer = Callable[[str, random.Random], str]

def complete_shapes(prompt: str, rng: random.Random, size: bool = True, cell: bool = True) -> str:
    """One object's prompt with a size drawn where it names none (after its article, a prompt without one keeps
    its size open) and a cell where it names none ("... in the top left"); each from the shapes data's uniform
    draw. Prompts of several objects are returned unchanged. ``size``/``cell`` False: leave that one open."""
    if len(object_phrases(prompt)) > 1:
        return prompt
    if size and named_value("size", prompt) is None:
        sized = re.sub(r"^(a|an) ", lambda _: "{a} " + rng.choice(list(SIZES)) + " ", prompt, count=1, flags=re.IGNORECASE)
        prompt = with_articles(sized)
    if cell and named_cell(prompt) is None:
        prompt = f"{prompt} in the {rng.choice(list(POSITIONS))}"
    return prompt


COMPLETERS: dict[str, Completer] = {"shapes": complete_shapes}


def completer_named(name: str) -> Completer:
    """A prompt completer by its config name (``complete=shapes``)."""
    if name not in COMPLETERS:
        raise ValueError(f"complete={name!r} is not a prompt completer; known: {sorted(COMPLETERS)}")
    return COMPLETERS[name]
