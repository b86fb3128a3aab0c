"""``evaluate.py mode=breakdown``: the interval, the zero-shot captions, the scoring rule (an extra object
costs ``count`` but not ``acc``), and a whole run on tiny random stages with a row per stage and split."""

import json

import pytest
import torch

from test_leaderboard import compose_evaluate, stages, tiny_overrides  # noqa: F401  (stages: a fixture)
from test_pipeline import save_stage
from test_upsampler import tiny_upsampler
from unclip.data.shapes import VOCAB
from unclip.eval import breakdown
from unclip.degradations import resize
from unclip.eval.attributes import CellPredictions, predict
from unclip.eval.attributes.net import CELL_OF
from unclip.eval.run import run

RED_CIRCLE = {"shape": "circle", "color": "red", "size": "small", "position": "top left"}
BLUE_SQUARE = {"shape": "square", "color": "blue", "size": "large", "position": "center"}


def test_wilson_interval_matches_its_formula_and_stays_open_at_the_edges():
    assert breakdown.wilson_half_width(0.5, 100) == pytest.approx(0.0962, abs=1e-4)
    assert breakdown.wilson_half_width(0.7, 400) < breakdown.wilson_half_width(0.7, 100)
    assert breakdown.wilson_half_width(1.0, 50) > 0.01  # a perfect score over 50 is not certainty


def test_zero_shot_candidates_differ_in_one_attribute_of_the_first_object():
    captions, truth = breakdown.zero_shot_candidates([RED_CIRCLE, BLUE_SQUARE], "color")
    assert len(captions) == len(VOCAB.colors) and captions[truth] == "a small red circle in the top left and a large blue square in the center"
    assert all(c.endswith("and a large blue square in the center") for c in captions)
    assert len(set(captions)) == len(captions)
    single, one = breakdown.zero_shot_candidates([RED_CIRCLE], "count")
    pair, two = breakdown.zero_shot_candidates([RED_CIRCLE, BLUE_SQUARE], "count")
    assert (one, two) == (0, 1) and single[0] == pair[0] == "a small red circle in the top left"
    assert " and " in single[1] and "circle" not in single[1].split(" and ")[1]  # another shape for a one-object image


def test_an_extra_object_costs_count_but_not_the_named_object():
    pool = breakdown.Pool.__new__(breakdown.Pool)
    pool.objects = [[RED_CIRCLE], [RED_CIRCLE, BLUE_SQUARE]]
    pool.asked = [[{"shape": "circle", "color": "red"}], pool.objects[1]]
    pool.captions = ["a red circle", "..."]
    perfect = CellPredictions.from_objects(pool.objects)
    rows = {r["objects"]: r for r in breakdown.score_rows("real", "val", perfect, pool)}
    assert rows["single"]["acc"] == rows["single"]["count"] == rows["two"]["prompt"] == 1.0
    assert rows["single"]["split"] == "seen" and rows["two"]["n"] == 1
    extra = CellPredictions.from_objects([[RED_CIRCLE, BLUE_SQUARE], pool.objects[1]])  # a second blob in image 0
    rows = {r["objects"]: r for r in breakdown.score_rows("real", "val", extra, pool)}
    assert rows["single"]["acc"] == 1.0 and rows["single"]["count"] == 0.0
    wrong_colour = CellPredictions.from_objects(pool.objects)
    wrong_colour.color[1, CELL_OF["center"]] = VOCAB.colors.index("red")
    rows = {r["objects"]: r for r in breakdown.score_rows("real", "val", wrong_colour, pool)}
    assert rows["two"]["acc"] == 0.5 and rows["two"]["prompt"] == 0.0 and rows["two"]["shape"] == 1.0


def test_rows_of_pixels_carry_the_outline_readers_verdict_beside_the_classifiers():
    from helpers import picture

    pool = breakdown.Pool.__new__(breakdown.Pool)
    pool.objects = [[dict(RED_CIRCLE)], [dict(RED_CIRCLE), dict(BLUE_SQUARE)]]
    pool.asked = [[{"shape": "circle", "color": "red"}], pool.objects[1]]
    pool.captions = ["a red circle", "..."]
    drawn = [[dict(RED_CIRCLE)], [dict(RED_CIRCLE), dict(BLUE_SQUARE)]]
    to_pixels = lambda images: torch.stack([torch.from_numpy(picture(o, seed=i)).permute(2, 0, 1) * 2 - 1  # noqa: E731
                                            for i, o in enumerate(images)])
    perfect = CellPredictions.from_objects(pool.objects)
    rows = {r["objects"]: r for r in breakdown.score_rows("real", "val", perfect, pool, to_pixels(drawn))}
    assert rows["single"]["outline"] == rows["two"]["outline"] == 1.0
    drawn[0].append(dict(BLUE_SQUARE))  # a second object where the caption names one: the classifier is told the same
    rows = {r["objects"]: r for r in breakdown.score_rows("real", "val", perfect, pool, to_pixels(drawn))}
    assert rows["single"]["outline"] == 0.0 and rows["single"]["prompt"] == 1.0 and rows["two"]["outline"] == 1.0
    assert "outline" not in breakdown.score_rows("real", "val", perfect, pool)[0]  # no pixels, no reading


def test_one_object_rows_say_which_shapes_a_stage_loses():
    import math

    pool = breakdown.Pool.__new__(breakdown.Pool)
    pool.objects = [[RED_CIRCLE], [BLUE_SQUARE], [RED_CIRCLE, BLUE_SQUARE]]
    pool.asked = [[{"shape": "circle", "color": "red"}], pool.objects[1], pool.objects[2]]
    pool.captions = ["a red circle", "...", "..."]
    pred = CellPredictions.from_objects(pool.objects)
    pred.shape[0, CELL_OF["top left"]] = 1 + VOCAB.shapes.index("hexagon")  # the circle drawn as a hexagon
    rows = {r["objects"]: r for r in breakdown.score_rows("decoder_true_zi", "val", pred, pool)}
    by_shape = rows["single"]["by_shape"]
    assert by_shape["circle"] == 0.0 and by_shape["square"] == 1.0 and math.isnan(by_shape["star"])
    assert "by_shape" not in rows["two"]


@pytest.mark.slow
def test_breakdown_scores_every_stage_on_seen_and_held_out_pairs(shapes_dir, cache_dir, stages, tmp_path):  # noqa: F811
    out = tmp_path / "breakdown"
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, out)
                           + ["mode=breakdown", f"priors=[{stages['diffusion']},{stages['ar']}]", "breakdown_pool=12"])
    rows = run(cfg)
    stages_seen = {(r["stage"], r["split"]) for r in rows}
    for stage in ("real", "clip_zero_shot", "decoder_true_zi", "diffusion_prior", "ar_prior"):
        assert {(stage, "seen"), (stage, "held-out")} <= stages_seen, stage
    for r in rows:
        assert r["n"] > 0 and 0.0 <= r["acc"] <= 1.0 and 0.0 <= r["count"] <= 1.0
        assert r["acc_ci"] > 0
    assert sum(r["n"] for r in rows if r["stage"] == "real" and r["split"] == "seen") == 12
    saved = json.loads((out / "breakdown.json").read_text())
    assert len(saved) == len(rows) and "| decoder_true_zi | held-out |" in (out / "breakdown.md").read_text()
    assert "by the object's shape" in (out / "breakdown.md").read_text()
    assert all(("by_shape" in r) == (r["objects"] == "single") for r in rows)
    assert all((r["stage"] == "clip_zero_shot") != (0.0 <= r.get("outline", -1) <= 1.0) for r in rows)  # every row of pixels
    again = run(cfg)  # the same seeds: the same numbers
    assert [r["acc"] for r in again] == [r["acc"] for r in rows]
    prompt = lambda rs: torch.tensor([r.get("prompt", float("nan")) for r in rs])  # noqa: E731 - zero-shot has none
    torch.testing.assert_close(prompt(again), prompt(rows), equal_nan=True)


@pytest.mark.slow
def test_breakdown_adds_each_priors_composed_row(shapes_dir, cache_dir, stages, tmp_path):  # noqa: F811
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path / "composed")
                           + ["mode=breakdown", f"priors=[{stages['diffusion']}]", "breakdown_pool=8",
                              "compose=object_phrases", "layout=true"])
    rows = run(cfg)
    label = "diffusion_prior composed (object_phrases, layout)"
    for split in ("seen", "held-out"):
        plain = {r["objects"]: r["n"] for r in rows if r["stage"] == "diffusion_prior" and r["split"] == split}
        composed = {r["objects"]: r["n"] for r in rows if r["stage"] == label and r["split"] == split}
        assert composed == plain and sum(composed.values()) == 8
    with pytest.raises(ValueError, match="not a prompt splitter"):
        run(compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path / "bad")
                             + ["mode=breakdown", f"priors=[{stages['diffusion']}]", "breakdown_pool=4", "compose=commas"]))


def test_breakdown_scores_the_upsampler_on_real_images_and_on_decoded_ones(shapes_dir, cache_dir, stages, tiny_clip,  # noqa: F811
                                                                            tmp_path, monkeypatch):
    """upsampled_real is the upsampler alone: the real images (at the decoder's 16 px) through it. A residual
    upsampler whose output layers are still zero draws exactly bicubic's answer, so the row must read the
    bicubic-upsampled real images."""
    upsampler = tiny_upsampler(diffusion=dict(schedule="cosine", num_timesteps=100, prediction="x0"), residual=True)
    path = save_stage(upsampler, tiny_clip, tmp_path / "upsampler.ckpt")
    read = []  # every image batch the classifier reads, in order

    def spy(classifier, images, *args, **kwargs):
        read.append(images.clone())
        return predict(classifier, images, *args, **kwargs)

    monkeypatch.setattr(breakdown, "predict", spy)
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path / "upsampled")
                           + ["mode=breakdown", "priors=[]", "breakdown_pool=8", f"upsamplers=[{path}]"])
    rows = run(cfg)
    pools = breakdown.load_pools(cfg, 16, 8)
    for split, pool in pools.items():
        label = breakdown.SPLITS[split]
        assert [r["n"] for r in rows if r["stage"] == "upsampled_real" and r["split"] == label] == [
            r["n"] for r in rows if r["stage"] == "real" and r["split"] == label]
        assert sum(r["n"] for r in rows if r["stage"] == "upsampled" and r["split"] == label) == len(pool) == 8
    # per split: real, upsampled_real, decoder_true_zi, upsampled
    assert len(read) == 4 * len(pools)
    for k, pool in enumerate(pools.values()):
        torch.testing.assert_close(read[4 * k + 1], resize(pool.images, 32), atol=1e-5, rtol=0)
        assert read[4 * k + 3].shape[-1] == 32 and not torch.allclose(read[4 * k + 3], read[4 * k + 1])
