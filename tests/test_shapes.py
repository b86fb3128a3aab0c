import json
import tarfile

import pytest
import webdataset as wds

from unclip.data.shapes import COLORS, DEFAULT_HOLDOUT, POSITIONS, SHAPES, SIZES, ShapesConfig, make_sample, parse_cli, write_shapes


def read_split(directory, split):
    samples = []
    for path in sorted(directory.glob(f"{split}-*.tar")):
        samples += list(wds.WebDataset(str(path), shardshuffle=False).decode("pil"))
    return samples


def test_vocabulary_is_rich_enough():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and len(SIZES) == 3 and len(POSITIONS) == 9


def test_shards_follow_the_img2dataset_layout(shapes_dir):
    manifest = json.loads((shapes_dir / "manifest.json").read_text())
    assert manifest["counts"]["train-00000.tar"] == 24 and sum(manifest["counts"].values()) == 96 + 24 + 24
    with tarfile.open(shapes_dir / "train-00000.tar") as tar:
        names = tar.getnames()
    key = names[0].split(".")[0]
    assert {f"{key}.png", f"{key}.txt", f"{key}.json"} <= set(names)
    sample = read_split(shapes_dir, "train")[0]
    assert sample["png"].size == (64, 64)
    meta = sample["json"]
    assert meta["split"] == "train" and {"shape", "color", "size", "position", "rgb"} <= set(meta["objects"][0])
    assert sample["txt"].strip()


def test_generation_is_deterministic_and_seed_dependent():
    cfg = ShapesConfig(size=32)
    a, b = make_sample(7, "train", cfg, set()), make_sample(7, "train", cfg, set())
    assert a[0] == b[0] and a[1].tobytes() == b[1].tobytes()
    other = make_sample(7, "train", ShapesConfig(size=32, seed=5), set())
    assert other[1].tobytes() != a[1].tobytes()


def test_captions_name_every_object_with_a_known_word(shapes_dir):
    for sample in read_split(shapes_dir, "train"):
        caption = sample["txt"]
        for obj in sample["json"]["objects"]:
            assert any(word in caption for word in SHAPES[obj["shape"]])
            assert any(word in caption for word in COLORS[obj["color"]][-1])


def test_bare_colour_shape_captions_are_part_of_training():
    """Prompts such as "a red circle" (the demo grid's, the prompt suite's) leave size and position open; a
    training set that always names one of them would never show the model such a caption."""
    cfg = ShapesConfig(size=16, supersample=1, p_two=0.0, synonyms=False)
    captions = [make_sample(i, "train", cfg, set())[0] for i in range(200)]
    bare = [c for c in captions if not any(w in c.split() for w in SIZES) and not any(p in c for p in POSITIONS)]
    assert len(bare) > 10
    assert all(len(c.split()) == 3 for c in bare), bare[:5]


def test_held_out_compositions_never_in_train_and_present_in_unseen(shapes_dir):
    holdout = {tuple(p) for p in DEFAULT_HOLDOUT}
    for sample in read_split(shapes_dir, "train") + read_split(shapes_dir, "val"):
        assert not {(o["shape"], o["color"]) for o in sample["json"]["objects"]} & holdout
    unseen = read_split(shapes_dir, "val_unseen")
    assert unseen and all((s["json"]["objects"][0]["shape"], s["json"]["objects"][0]["color"]) in holdout for s in unseen)


def test_rerun_with_same_settings_is_skipped(shapes_dir):
    before = (shapes_dir / "train-00000.tar").stat().st_mtime_ns
    write_shapes(ShapesConfig(out=str(shapes_dir), n=96, n_val=24, n_val_unseen=24, shards=4, size=64, seed=1))
    assert (shapes_dir / "train-00000.tar").stat().st_mtime_ns == before


def test_shards_written_side_by_side_hold_what_one_process_writes(tmp_path):
    """Two processes writing shards at once write the same samples and manifest as one process alone."""
    for workers in (1, 2):
        write_shapes(ShapesConfig(out=str(tmp_path / str(workers)), n=96, n_val=24, n_val_unseen=24, shards=4, size=64,
                                  seed=1), workers=workers)

    def contents(directory, split):  # each sample less where it was read from
        return [{k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")} for sample in read_split(directory, split)]

    one, two = tmp_path / "1", tmp_path / "2"
    for split in ("train", "val", "val_unseen"):
        assert contents(one, split) and contents(one, split) == contents(two, split)
    assert (one / "manifest.json").read_text() == (two / "manifest.json").read_text()


def test_cli_rejects_unknown_keys_and_holdout():
    with pytest.raises(SystemExit, match="bad argument 'colour=red'"):
        parse_cli(["colour=red"])
    assert parse_cli(["n=5", "holdout=[[star, red]]"]).holdout == [["star", "red"]]
    from unclip.data.shapes import validate_holdout
    with pytest.raises(ValueError, match="unknown shape or colour"):
        validate_holdout([["blob", "red"]])


def test_an_image_redraws_from_its_stored_geometry_and_a_counterfactual_changes_one_outline():
    import numpy as np

    from unclip.data.shapes import counterfactual_image

    cfg = ShapesConfig(size=64)
    for index in range(12):
        _, image, meta = make_sample(index, "train", cfg, set(DEFAULT_HOLDOUT))
        meta = json.loads(json.dumps(meta))  # as KEY.json gives it back
        original = np.asarray(image, dtype=int)
        same = [counterfactual_image(meta, i, obj["shape"]) for i, obj in enumerate(meta["objects"])]
        assert all(np.array_equal(np.asarray(s, dtype=int), original) for s in same)  # pixel for pixel
        other = "hexagon" if meta["objects"][0]["shape"] == "circle" else "circle"
        changed = np.abs(np.asarray(counterfactual_image(meta, 0, other), dtype=int) - original).max(-1) > 0
        cx, cy, r, _ = meta["objects"][0]["geometry"]
        ys, xs = np.nonzero(changed)
        assert len(xs) > 0  # the outline moved ...
        # ... and nothing else did: every changed pixel lies within the largest outline (a star's, 1.25 r) plus the
        # reach of the downsampling filter (Lanczos-3: 3 px)
        assert np.all(np.hypot(xs + 0.5 - cx * 64, ys + 0.5 - cy * 64) < 1.25 * r * 64 + 3)
    with pytest.raises(ValueError, match="regenerate the shapes data"):
        counterfactual_image({**meta, "objects": [{k: v for k, v in o.items() if k != "geometry"} for o in meta["objects"]]}, 0, "star")


def test_a_counterfactual_shape_is_the_look_alike_and_never_a_held_out_pair():
    import random

    from unclip.data.shapes import counterfactual_shape

    rng = random.Random(0)
    circle = {"objects": [{"shape": "circle", "color": "red"}]}
    assert {counterfactual_shape(circle, rng) for _ in range(20)} == {(0, "hexagon")}
    purple_hexagon = {"objects": [{"shape": "hexagon", "color": "purple"}]}  # its twin, a purple circle, is held out
    drawn = {counterfactual_shape(purple_hexagon, rng)[1] for _ in range(200)}
    assert "circle" not in drawn and "hexagon" not in drawn and len(drawn) == 4
