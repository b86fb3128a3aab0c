"""The shapes prompt suite: the file on disk is what the generator builds, labels are in the vocabulary,
the held-out compositions are there, and the variant phrasings never occur in training captions."""

import re

import pytest

from unclip.data.shapes import DEFAULT_HOLDOUT, VOCAB, ShapesConfig, make_sample, validate_holdout
from unclip.eval.prompt_suites import VARIANT_WORDS, build_suite, load_suite, main

TAGS = {"single", "two", "variant", "holdout"}
VALUES = {"shape": set(VOCAB.shapes), "color": set(VOCAB.colors), "size": set(VOCAB.sizes), "position": set(VOCAB.positions)}


@pytest.fixture(scope="module")
def suite():
    return load_suite("v1")


@pytest.fixture(scope="module")
def training_captions():
    """Captions exactly as the shapes writer makes them for train (tiny renders: the caption is drawn
    from the generator before the image, so the image size does not change it)."""
    cfg = ShapesConfig(size=8, supersample=1)
    holdout = validate_holdout(cfg.holdout)
    return [make_sample(i, "train", cfg, holdout)[0] for i in range(4000)]


def test_suite_file_is_current_and_parses(suite, tmp_path):
    assert suite == build_suite("v1")  # the checked-in file is what `python -m unclip.eval.prompt_suites` writes
    assert len(suite) >= 200
    assert len({e["prompt"] for e in suite}) == len(suite)  # no prompt twice
    main([f"out={tmp_path}/suite.yaml"])
    assert load_suite(path=tmp_path / "suite.yaml") == suite
    with pytest.raises(ValueError, match="unknown prompt suite version"):
        build_suite("v0")


def test_labels_are_vocabulary_names_and_tags_fit_them(suite):
    for e in suite:
        assert set(e) <= {"prompt", "objects", "tags", "phrasing"} and e["prompt"].strip()
        assert set(e["tags"]) <= TAGS
        assert ("single" in e["tags"]) == (len(e["objects"]) == 1) and ("two" in e["tags"]) == (len(e["objects"]) == 2)
        for obj in e["objects"]:
            assert {"shape", "color"} <= set(obj) <= set(VALUES), e
            for attribute, value in obj.items():
                assert value in VALUES[attribute], (attribute, value, e["prompt"])
        if len(e["objects"]) == 2:  # two objects never share a cell
            assert e["objects"][0].get("position") != e["objects"][1].get("position")
    kinds = {tag: sum(tag in e["tags"] for e in suite) for tag in TAGS}
    assert min(kinds.values()) >= 20, kinds


def test_canonical_prompts_name_their_labels(suite):
    for e in suite:
        if "variant" in e["tags"]:
            continue
        for obj in e["objects"]:
            for value in obj.values():
                assert re.search(rf"\b{value}\b", e["prompt"]), (value, e["prompt"])


def test_holdout_pairs_appear_and_are_tagged(suite):
    holdout = {tuple(p) for p in DEFAULT_HOLDOUT}
    for e in suite:
        has_holdout = any((o["shape"], o["color"]) in holdout for o in e["objects"])
        assert ("holdout" in e["tags"]) == has_holdout, e
    for pair in holdout:
        tags = [set(e["tags"]) for e in suite if any((o["shape"], o["color"]) == pair for o in e["objects"])]
        assert any("single" in t for t in tags) and any("two" in t for t in tags) and any("variant" in t for t in tags), pair


def test_variant_phrasings_never_occur_in_training_captions(suite, training_captions):
    text = "\n".join(training_captions)
    captions = set(training_captions)
    # the sampled captions do show training's own wordings (the check below can find a phrase)
    for phrase in ("a picture of", "next to", "crimson", "upper left", "round dot"):
        assert re.search(rf"\b{re.escape(phrase)}\b", text), phrase
    variants = [e for e in suite if "variant" in e["tags"]]
    assert len(variants) >= 50
    for e in variants:
        assert e["prompt"] not in captions
        assert e["phrasing"], e
        for phrase in e["phrasing"]:
            assert phrase in e["prompt"]
            assert not re.search(rf"\b{re.escape(phrase)}\b", text), (phrase, e["prompt"])
    # every new word is used, and names a value of the attribute it stands for
    used = {p for e in variants for p in e["phrasing"]}
    for attribute, table in VARIANT_WORDS.items():
        assert set(table) == VALUES[attribute] and set(table.values()) <= used
