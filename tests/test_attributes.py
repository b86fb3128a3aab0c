import math
import random

import pytest
import torch

from unclip.eval.attributes import (CellPredictions, ClassifierConfig, AttributeNet, attribute_accuracy, load_classifier,
                                    named_objects, objects_from_caption, predict, save_classifier, score_predictions)
from unclip.eval.attributes.net import CELL_OF, encode_targets, hflip
from unclip.eval.attributes.training import TrainConfig, load_split, train_classifier
from unclip.data.datamodule import CaptionImageDataModule
from unclip.data.shapes import PAIR_TEMPLATES, TEMPLATES, VOCAB, caption_for, sample_objects
from unclip.eval.image_metrics import (clip_score, clip_score_embeddings, fd_clip, fd_clip_metric, frechet_distance,
                                       inception_metrics)

@pytest.fixture(autouse=True)
def one_thread():
    """These nets are tiny: a second thread gains nothing, and on a busy machine its barriers cost ~10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


RED_CIRCLE = {"shape": "circle", "color": "red", "size": "small", "position": "top left"}
BLUE_STAR = {"shape": "star", "color": "blue", "size": "large", "position": "bottom right"}


def test_cells_are_row_major_like_vocab_positions():
    assert [CELL_OF[p] for p in ("top left", "top", "top right", "center", "bottom left", "bottom right")] == [0, 1, 2, 4, 6, 8]
    targets = encode_targets([[RED_CIRCLE, BLUE_STAR]])
    assert targets["shape"][0].tolist() == [1 + VOCAB.shapes.index("circle"), 0, 0, 0, 0, 0, 0, 0, 1 + VOCAB.shapes.index("star")]
    assert targets["color"][0, 8] == VOCAB.colors.index("blue") and targets["color"][0, 4] < 0  # empty cells are ignored
    # mirroring swaps the left and right columns, labels with the pixels
    _, flipped = hflip(torch.zeros(1, 3, 6, 6), targets)
    assert flipped["shape"][0, 2] == targets["shape"][0, 0] and flipped["shape"][0, 6] == targets["shape"][0, 8]


def test_perfect_prediction_scores_one_and_wrong_colour_fails_only_its_object():
    objects = [[RED_CIRCLE, BLUE_STAR], [dict(RED_CIRCLE, position="center")]]
    perfect = score_predictions(CellPredictions.from_objects(objects), objects)
    assert {k: perfect[k] for k in ("attr_acc", "attr_shape", "attr_color", "attr_size", "attr_position", "attr_prompt")} == \
        dict.fromkeys(("attr_acc", "attr_shape", "attr_color", "attr_size", "attr_position", "attr_prompt"), 1.0)
    assert perfect["n_objects"] == 3  # two-object prompts are scored object by object
    wrong = CellPredictions.from_objects(objects)
    wrong.color[0, CELL_OF["bottom right"]] = VOCAB.colors.index("green")  # the star drawn green
    scores = score_predictions(wrong, objects)
    assert scores["attr_acc"] == pytest.approx(2 / 3) and scores["attr_color"] == pytest.approx(2 / 3)
    assert scores["attr_shape"] == 1.0 and scores["attr_position"] == 1.0
    assert scores["attr_prompt"] == 0.5  # the two-object image is no longer right as a whole
    alone = score_predictions(CellPredictions(wrong.shape[:1], wrong.color[:1], wrong.size[:1]), [[BLUE_STAR]])
    assert alone["attr_acc"] == 0.0 and alone["attr_shape"] == 1.0


def test_object_in_the_wrong_cell_or_missing_is_wrong():
    drawn = CellPredictions.from_objects([[dict(RED_CIRCLE, position="center")]])
    scores = score_predictions(drawn, [[RED_CIRCLE]])  # asked for top left, drawn in the centre
    assert scores["attr_acc"] == 0.0 and scores["attr_position"] == 0.0
    empty = CellPredictions.from_objects([[]])
    assert score_predictions(empty, [[RED_CIRCLE]])["attr_acc"] == 0.0


def test_unnamed_position_and_size_are_not_asked_for():
    drawn = CellPredictions.from_objects([[dict(RED_CIRCLE, position="bottom", size="large")]])
    prompt = [[{"shape": "circle", "color": "red"}]]  # "a red circle": anywhere, any size
    scores = score_predictions(drawn, prompt)
    assert scores["attr_acc"] == 1.0 and math.isnan(scores["attr_size"]) and math.isnan(scores["attr_position"])
    assert score_predictions(drawn, [[{"shape": "circle", "color": "red", "size": "small"}]])["attr_size"] == 0.0
    # two unplaced red circles need two cells holding one
    assert score_predictions(drawn, [[prompt[0][0], prompt[0][0]]])["attr_acc"] == 0.5
    # a colour match elsewhere does not count as the object
    assert score_predictions(drawn, [[{"shape": "star", "color": "red"}]])["attr_acc"] == 0.0


def test_named_objects_and_caption_parsing_agree_with_the_caption_writer():
    rng = random.Random(0)
    for index in range(400):
        objects = sample_objects(rng, 0.3, lambda s, c, i: True)
        template = rng.randrange(len(TEMPLATES) if len(objects) == 1 else len(PAIR_TEMPLATES))
        caption = caption_for(objects, template, rng, synonyms=True)
        meta = {"objects": objects, "template": template}
        assert objects_from_caption(caption) == named_objects(meta), caption
    assert objects_from_caption("a large blue square") == [{"shape": "square", "color": "blue", "size": "large"}]
    assert objects_from_caption("top left: tiny crimson disc") == [RED_CIRCLE]
    with pytest.raises(ValueError, match="names no shape and colour"):
        objects_from_caption("a photo of a dog")


@pytest.mark.parametrize("size", [32, 64])
def test_classifier_reads_any_resolution(size):
    net = AttributeNet(ClassifierConfig(image_size=24, channels=(8, 16), width=16))
    logits = net(torch.rand(3, 3, size, size) * 2 - 1)
    assert logits["shape"].shape == (3, 9, 1 + len(VOCAB.shapes))
    assert logits["color"].shape == (3, 9, len(VOCAB.colors)) and logits["size"].shape == (3, 9, len(VOCAB.sizes))
    pred = predict(net, torch.zeros(5, 3, size, size), batch_size=2)
    assert pred.shape.shape == (5, 9) and pred.shape.dtype == torch.long and net.training  # mode restored
    with pytest.raises(ValueError, match="multiple of 3"):
        ClassifierConfig(image_size=32, channels=(8, 16))


def test_tiny_classifier_learns_the_shapes_fixture(shapes_dir, tmp_path):
    data = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), val=str(shapes_dir / "val-*.tar"), fields=["image", "meta"],
                                  batch_size=32, val_batch_size=32, image_size=None, shuffle=False)
    images, metas = load_split(data, "train")
    assert images.dtype == torch.uint8 and images.shape == (96, 3, 64, 64) and len(metas) == 96
    objects = [m["objects"] for m in metas]
    config = ClassifierConfig(image_size=24, channels=(16, 32), width=32)
    net = train_classifier(images, objects, config, TrainConfig(batch_size=32, lr=1e-2, warmup_steps=5, log_every=0), steps=80)
    unit = images.float() / 127.5 - 1
    scores = attribute_accuracy(net, unit, objects)
    # chance: 1/8 for colour, ~0 for a right (shape, colour) in the right cell
    assert scores["attr_color"] > 0.6 and scores["attr_position"] > 0.9 and scores["attr_acc"] > 0.25, scores
    path = save_classifier(net, tmp_path / "attributes" / "tiny.pt", {"attr_acc": scores["attr_acc"]})
    assert torch.load(path, weights_only=True)["metrics"]["attr_acc"] == scores["attr_acc"]
    loaded = load_classifier(path)
    assert torch.equal(predict(loaded, unit).shape, predict(net, unit).shape)
    with pytest.raises(FileNotFoundError, match="python train_classifier.py"):
        load_classifier(tmp_path / "missing.pt")


def test_clip_score_is_higher_for_matched_pairs():
    generator = torch.Generator().manual_seed(0)
    z_img = torch.randn(64, 32, generator=generator)
    z_txt = z_img + 0.5 * torch.randn(64, 32, generator=generator)  # captions close to their own image
    matched = clip_score_embeddings(z_img, z_txt)
    shuffled = clip_score_embeddings(z_img, z_txt.roll(1, 0))
    assert matched.shape == (64,) and (matched >= 0).all() and (matched <= 100).all()
    assert matched.mean() > 60 and shuffled.mean() < 20
    assert clip_score_embeddings(z_img, -z_img).eq(0).all()  # max(cos, 0): opposite is 0, not negative


def test_clip_score_uses_the_runs_clip(tiny_clip, shapes_dir):
    data = CaptionImageDataModule(train=str(shapes_dir / "val-*.tar"), fields=["image", "caption"], batch_size=24, image_size=64,
                                  shuffle=False)
    batch = next(iter(data.train_dataloader()))
    images, captions = batch["image"][:12], batch["caption"][:12]
    expected = clip_score_embeddings(tiny_clip.encode_image(images), tiny_clip.encode_text(captions).z_txt).mean()
    assert clip_score(tiny_clip, images, captions, batch_size=5) == pytest.approx(float(expected), rel=1e-5)
    # Fréchet distance of a set with itself is 0; a shifted set is further away
    real, other = batch["image"][:12], batch["image"][12:24]
    assert fd_clip(tiny_clip, real, real) == pytest.approx(0.0, abs=1e-4)
    assert fd_clip(tiny_clip, real, (real + 0.8).clamp(-1, 1)) > fd_clip(tiny_clip, real, real) + 1e-3
    # torchmetrics accumulates batches to the same value as one call
    metric = fd_clip_metric(tiny_clip)
    metric.update(real[:6], real=True), metric.update(real[6:], real=True)
    metric.update(other[:5], real=False), metric.update(other[5:], real=False)
    assert float(metric.compute()) == pytest.approx(fd_clip(tiny_clip, real, other), rel=1e-4, abs=1e-6)


def test_frechet_distance_matches_closed_forms():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(400, 16, generator=generator) @ torch.randn(16, 16, generator=generator) * 0.3 + 1.0
    assert frechet_distance(z, z) == pytest.approx(0.0, abs=1e-6)
    shift = torch.full((16,), 0.25)
    # same covariance, means apart by `shift`: the distance is |shift|^2
    assert frechet_distance(z, z + shift) == pytest.approx(float(shift.square().sum()), rel=1e-4)
    # doubling: |mu|^2 + tr(S + 4S - 2 * 2S) = |mu|^2 + tr(S)
    centred = z - z.mean(0)
    expected = float(z.mean(0).square().sum() + centred.square().sum() / (len(z) - 1))
    assert frechet_distance(z, 2 * z) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="embedding sets"):
        frechet_distance(z, z[:, :8])


def test_inception_metrics_are_skipped_without_local_weights(tmp_path, caplog):
    images = torch.zeros(4, 3, 32, 32)
    with caplog.at_level("INFO", logger="unclip.eval.image_metrics"):
        assert inception_metrics(images, images, weights=tmp_path / "absent.pth") is None
    assert "Inception FID/KID skipped" in caplog.text
