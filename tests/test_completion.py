"""Prompt completion: a size and a cell drawn where a one-object prompt names none, and a pipeline that samples
each image from its completed prompt while reporting the prompt as asked."""

import random
import re

import pytest
import torch

from test_pipeline import clip, pipe, stages  # noqa: F401  (module fixtures)
from unclip.completion import complete_shapes, completer_named
from unclip.composition import named_cell
from unclip.data.shapes import POSITIONS, SIZES

SIZE, CELL = "|".join(SIZES), "|".join(POSITIONS)


def test_an_open_size_and_cell_are_drawn_from_the_whole_vocabulary():
    rng = random.Random(0)
    drawn = [complete_shapes("a red circle", rng) for _ in range(300)]
    assert all(re.fullmatch(rf"a ({SIZE}) red circle in the ({CELL})", d) for d in drawn), drawn[:3]
    assert {d.split()[1] for d in drawn} == set(SIZES)
    assert len({named_cell(d) for d in drawn}) == 9
    # the article follows the drawn size; a named cell is kept
    assert re.fullmatch(rf"a ({SIZE}) orange triangle at the bottom", complete_shapes("an orange triangle at the bottom", rng))
    # a named size (a synonym too) is kept, and only the cell is drawn
    assert re.fullmatch(rf"a big blue square in the ({CELL})", complete_shapes("a big blue square", rng))
    # either draw alone
    assert re.fullmatch(rf"a red circle in the ({CELL})", complete_shapes("a red circle", rng, size=False))
    assert re.fullmatch(rf"a ({SIZE}) red circle", complete_shapes("a red circle", rng, cell=False))
    # the same generator state, the same completion
    assert complete_shapes("a pink star", random.Random(3)) == complete_shapes("a pink star", random.Random(3))


@pytest.mark.parametrize("prompt", ["a large red disc in the upper left",
                                    "a red circle in the left and a blue star in the right",
                                    "a small blue square in the top, next to a pink star in the bottom"])
def test_prompts_that_say_everything_or_name_several_objects_are_kept(prompt):
    assert complete_shapes(prompt, random.Random(0)) == prompt


def test_completers_are_named_in_config():
    assert completer_named("shapes") is complete_shapes
    with pytest.raises(ValueError, match="complete='llm' is not a prompt completer; known: \\['shapes'\\]"):
        completer_named("llm")


def test_the_pipeline_samples_each_image_from_its_own_completion(pipe):  # noqa: F811
    asked = []

    def recorded(place):
        def complete(prompt, rng):
            asked.append(prompt)
            return f"{prompt} in the {rng.choice(['top left', 'bottom right'])}" if place else prompt
        return complete

    prompts = ["a red circle", "a blue star"]
    placed = pipe.generate(prompts, n=3, seed=5, complete=recorded(True))
    assert asked == ["a red circle"] * 3 + ["a blue star"] * 3
    as_written = pipe.generate(prompts, n=3, seed=5, complete=recorded(False))
    # the same noise (the completion's draw comes first either way), so only the completed prompts differ
    assert not torch.allclose(placed.pixels, as_written.pixels, atol=1e-3)
    torch.testing.assert_close(pipe.generate(prompts, n=3, seed=5, complete=recorded(True)).pixels, placed.pixels)
    # z_t is the prompt's as asked, what reranking and metrics compare against
    torch.testing.assert_close(placed.z_txt, pipe.clip.encode_text([p for p in prompts for _ in range(3)]).z_txt)
    reranked = pipe.generate(prompts, n=1, seed=5, complete=complete_shapes, rerank=2)
    assert reranked.pixels.shape[0] == 2
