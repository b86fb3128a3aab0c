"""Conjunctions by composition (Composable Diffusion): the guidance sum, the prompt splitters, and a pipeline
whose one-part prompts sample exactly as without composition."""

import pytest
import torch

from test_pipeline import clip, pipe, stages  # noqa: F401  (module fixtures)
from unclip.composition import conjunction, object_phrases, split_and
from unclip.diffusion import classifier_free_guidance, composed_guidance


def stacked(values):
    """A model whose rows of condition k return values[k] and whose unconditional rows return values[-1]."""
    def fn(x, t):
        b = x.shape[0] // len(values)
        return torch.cat([torch.full_like(x[:b], v) for v in values])
    return fn


def test_composed_guidance_sums_each_parts_direction():
    x, t = torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)
    weights = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.5]])
    out = composed_guidance(stacked([3.0, 5.0, 1.0]), weights, 2.0)(x, t)
    # 1 + 2 * (w1 * (3 - 1) + w2 * (5 - 1))
    torch.testing.assert_close(out, torch.tensor([[13.0] * 2, [5.0] * 2, [9.0] * 2]))
    # one part of weight 1 is plain classifier-free guidance
    one = composed_guidance(stacked([3.0, 1.0]), torch.ones(1, 3), 4.0)(x, t)
    torch.testing.assert_close(one, classifier_free_guidance(stacked([3.0, 1.0]), 4.0)(x, t))
    # a learned variance (second half of the channels) is the first part's, not guided
    guided = composed_guidance(stacked([3.0, 5.0, 1.0]), torch.ones(2, 3), 1.0, learned_variance=True)(x, t)
    torch.testing.assert_close(guided, torch.tensor([[1.0 + 2 + 4, 3.0]]).expand(3, 2))


def test_prompts_split_into_their_parts():
    assert split_and("a red circle AND a blue square in the top left") == ["a red circle", "a blue square in the top left"]
    assert split_and("a black and white cat") == ["a black and white cat"]
    assert object_phrases("a large red circle in the left and a small blue box in the right") == [
        "a large red circle in the left", "a small blue box in the right"]
    assert object_phrases("a medium orange hexagon in the top, next to a tiny cyan disc in the bottom") == [
        "a medium orange hexagon in the top", "a tiny cyan disc in the bottom"]
    assert object_phrases("a red circle") == ["a red circle"]
    parts, weights = conjunction(["x AND y", "z"], split_and)
    assert parts == [["x", "z"], ["y", "z"]]  # a one-part prompt repeats its part, at weight 0
    torch.testing.assert_close(weights, torch.tensor([[1.0, 1.0], [1.0, 0.0]]))


def test_composition_leaves_one_part_prompts_as_they_were_and_draws_conjunctions(pipe):  # noqa: F811
    prompts = ["a red circle", "a blue star"]
    plain = pipe.generate(prompts, n=2, seed=3, decoder_guidance=3.0)
    composed = pipe.generate(prompts, n=2, seed=3, decoder_guidance=3.0, compose=split_and)
    torch.testing.assert_close(composed.pixels, plain.pixels, atol=1e-4, rtol=0)
    torch.testing.assert_close(composed.z_img, plain.z_img, atol=1e-5, rtol=0)

    both = pipe.generate(["a red circle AND a blue star", "a red circle"], n=2, seed=3, decoder_guidance=3.0,
                         compose=split_and)
    assert both.pixels.shape == (4, 3, 16, 16) and both.pixels.abs().max() <= 1
    torch.testing.assert_close(both.z_img.norm(dim=-1), torch.ones(4))
    again = pipe.generate(["a red circle AND a blue star", "a red circle"], n=2, seed=3, decoder_guidance=3.0,
                          compose=split_and)
    torch.testing.assert_close(both.pixels, again.pixels)
    # the conjunction is not its first part alone
    first = pipe.generate(["a red circle", "a red circle"], n=2, seed=3, decoder_guidance=3.0, compose=split_and)
    assert not torch.allclose(both.pixels[:2], first.pixels[:2], atol=1e-3)


def test_the_whole_caption_leads_its_parts_and_splitters_are_named():
    from unclip.composition import splitter_named, whole_and_object_phrases

    caption = "a red circle in the left and a blue box in the right"
    assert whole_and_object_phrases(caption) == [caption, "a red circle in the left", "a blue box in the right"]
    assert whole_and_object_phrases("a red circle") == ["a red circle"]
    assert splitter_named("split_and") is split_and
    with pytest.raises(ValueError, match="not a prompt splitter"):
        splitter_named("commas")


def test_layout_weights_put_each_part_where_its_words_say():
    from unclip.composition import layout_weights, named_cell

    assert named_cell("a large yellow star in the top left") == (0, 0)
    assert named_cell("a cyan circle in the lower right") == (2, 2)
    assert named_cell("a medium hexagon in the top") == (1, 0)
    assert named_cell("a red circle") is None
    parts, weights = conjunction(["a red circle in the left and a blue square in the right", "a pink star",
                                  "a red circle and a blue square"], object_phrases)
    maps = layout_weights(parts, weights, size=12)
    assert maps.shape == (2, 3, 1, 12, 12)
    torch.testing.assert_close(maps[:, :2].sum(0), torch.ones(2, 1, 12, 12))  # placed: one at every pixel
    left, right = maps[:, 0, 0, 6]  # the middle row, left to right
    assert left[0] > 0.9 and right[0] < 0.1 and left[-1] < 0.1 and right[-1] > 0.9
    assert (maps[:, 0, 0, :, 5:7] - 0.5).abs().max() < 0.2  # the middle column is shared
    torch.testing.assert_close(maps[:, 1], torch.tensor([1.0, 0.0]).view(2, 1, 1, 1).expand(2, 1, 12, 12))
    torch.testing.assert_close(maps[:, 2], torch.ones(2, 1, 12, 12))  # no cell named: the parts' weights as they were


def test_spatial_weights_guide_each_region_towards_its_own_part():
    x, t = torch.zeros(1, 3, 4, 4), torch.zeros(1, dtype=torch.long)
    left = torch.zeros(4, 4)
    left[:, :2] = 1.0
    weights = torch.stack([left, 1 - left]).view(2, 1, 1, 4, 4)
    out = composed_guidance(stacked([3.0, 5.0, 1.0]), weights, 2.0)(x, t)
    torch.testing.assert_close(out[0, :, :, :2], torch.full((3, 4, 2), 5.0))  # 1 + 2 (3 - 1)
    torch.testing.assert_close(out[0, :, :, 2:], torch.full((3, 4, 2), 9.0))  # 1 + 2 (5 - 1)
    # maps at another resolution are resized to the image's
    coarse = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)]).view(2, 1, 1, 2, 2)
    torch.testing.assert_close(composed_guidance(stacked([3.0, 5.0, 1.0]), coarse, 2.0)(x, t), torch.full((1, 3, 4, 4), 5.0))


def test_layout_composition_keeps_one_part_prompts_and_needs_a_splitter(pipe):  # noqa: F811
    prompts = ["a red circle in the top left", "a blue star"]
    plain = pipe.generate(prompts, n=1, seed=5, decoder_guidance=3.0)
    placed = pipe.generate(prompts, n=1, seed=5, decoder_guidance=3.0, compose=object_phrases, layout=True)
    torch.testing.assert_close(placed.pixels, plain.pixels, atol=1e-4, rtol=0)
    two = pipe.generate(["a red circle in the left and a blue star in the right"], n=2, seed=5, decoder_guidance=3.0,
                        compose=object_phrases, layout=True)
    everywhere = pipe.generate(["a red circle in the left and a blue star in the right"], n=2, seed=5,
                               decoder_guidance=3.0, compose=object_phrases)
    assert two.pixels.shape == (2, 3, 16, 16) and not torch.allclose(two.pixels, everywhere.pixels, atol=1e-3)
    with pytest.raises(ValueError, match="needs compose"):
        pipe.generate(prompts, layout=True)


def test_rerank_keeps_the_candidate_clip_finds_closest_to_its_prompt(pipe):  # noqa: F811
    prompts = ["a red circle", "a blue star in the left and a green square in the right"]
    candidates = pipe.generate(prompts, n=2 * 3, seed=7, compose=object_phrases, layout=True)
    kept = pipe.generate(prompts, n=2, seed=7, compose=object_phrases, layout=True, rerank=3)
    assert kept.pixels.shape == (4, 3, 16, 16) and len(kept.images) == 4
    scores = (pipe.clip.encode_image(candidates.pixels) * candidates.z_txt).sum(-1).view(4, 3)
    best = candidates.pixels.view(4, 3, 3, 16, 16)[torch.arange(4), scores.argmax(1)]
    torch.testing.assert_close(kept.pixels, best)
    torch.testing.assert_close(kept.z_txt[::2], candidates.z_txt[::6])  # each prompt keeps its own candidates
    with pytest.raises(ValueError, match="at least 1"):
        pipe.generate(prompts, rerank=0)
