import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unclip.data.datamodule import CaptionImageDataModule
from unclip.modules.clip_pretrain import ClipPretrainModule, retrieval_topk, zero_shot_attributes


def test_retrieval_topk_on_known_similarities():
    z = torch.eye(4)
    assert retrieval_topk(z, z) == {1: 1.0, 5: 1.0}
    shuffled = z[[1, 0, 2, 3]]  # captions 0 and 1 point at each other's images
    assert retrieval_topk(shuffled, z, ks=(1,))[1] == 0.5


def test_zero_shot_uses_the_nearest_class_prompt():
    def encode(texts):  # a fake text tower: one axis per shape word, colour ignored
        from unclip.data.shapes import VOCAB
        out = torch.zeros(len(texts), 16)
        for i, t in enumerate(texts):
            for j, s in enumerate(VOCAB.shapes):
                out[i, j] += float(t.endswith(s))
            for j, c in enumerate(VOCAB.colors):
                out[i, 6 + j] += float(f" {c} " in f" {t} ")
        return out

    metas = [{"objects": [{"shape": "star", "color": "red"}]}, {"objects": [{"shape": "circle", "color": "blue"}]}]
    z_img = F.normalize(torch.stack([torch.eye(16)[3] + torch.eye(16)[6], torch.eye(16)[0] + torch.eye(16)[11]]), dim=-1)
    assert zero_shot_attributes(encode, z_img, metas) == {"shape": 1.0, "color": 1.0}


def test_contrastive_loss_falls_on_a_fixed_batch(shapes_dir):
    torch.manual_seed(0)
    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["image", "caption"], batch_size=16,
                                image_size=64, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = ClipPretrainModule("unclip-tiny")
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        z_img, z_txt, scale = module.encode(batch["image"], batch["caption"])
        loss = module.loss_fn(z_img, z_txt, scale)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def named(text: str, table: dict) -> list[str]:
    """The attribute values a caption names, in order, read through the vocabulary's synonyms."""
    words = {w: v for v, entry in table.items() for w in (entry[-1] if isinstance(entry, tuple) else entry)}
    hits = [(text.find(f" {w}"), len(w), v) for w, v in words.items() if f" {w}" in f" {text}"]
    hits = [h for h in hits if not any(o[0] <= h[0] < o[0] + o[1] and o[1] > h[1] for o in hits)]  # longest words win
    return [v for _, _, v in sorted(hits)]


def test_hard_negative_captions_change_one_thing_and_never_name_a_held_out_pair():
    import random

    from unclip.data.shapes import COLORS, DEFAULT_HOLDOUT, SHAPES, hard_negative_caption

    rng = random.Random(0)
    single = {"objects": [{"shape": "circle", "color": "red", "size": "large", "position": "left"}], "template": 5}
    pair = {"objects": [{"shape": "star", "color": "yellow", "size": "small", "position": "top"},
                        {"shape": "square", "color": "blue", "size": "large", "position": "bottom"}], "template": 0}
    held_out = set(DEFAULT_HOLDOUT)
    swaps = 0
    for _ in range(200):
        text = hard_negative_caption(single, rng)
        shape, color = named(text, SHAPES)[0], named(text, COLORS)[0]
        assert (shape != "circle") + (color != "red") == 1, text  # exactly one of shape and colour is wrong
        assert (shape, color) not in held_out, text
        text = hard_negative_caption(pair, rng)
        shapes, colors = named(text, SHAPES), named(text, COLORS)
        assert not set(zip(shapes, colors)) & held_out, text
        swaps += (shapes, colors) == (["star", "square"], ["blue", "yellow"])
    assert 35 < swaps < 100  # about a third of the pair's negatives swap its two colours
    assert hard_negative_caption({"objects": []}, rng) is None


def test_lookalike_negatives_name_the_twin_shape_as_often_as_asked_and_never_a_held_out_pair():
    """A circle's changed shape is "hexagon" about ``lookalike`` of the time (a uniform draw: 1/5); a purple
    hexagon's twin would be the held-out purple circle, so it falls back to the uniform draw."""
    import random

    from unclip.data.shapes import COLORS, SHAPES, hard_negative_caption

    def twin_share(meta: dict, lookalike: float) -> float:
        rng = random.Random(0)
        changed = [named(hard_negative_caption(meta, rng, lookalike=lookalike), SHAPES)[0] for _ in range(1000)]
        changed = [shape for shape in changed if shape != meta["objects"][0]["shape"]]
        return sum(shape == {"circle": "hexagon", "hexagon": "circle"}[meta["objects"][0]["shape"]] for shape in changed) / len(changed)

    red_circle = {"objects": [{"shape": "circle", "color": "red", "size": "large", "position": "left"}], "template": 5}
    assert 0.12 < twin_share(red_circle, 0.0) < 0.28
    assert 0.8 < twin_share(red_circle, 0.8) < 0.9  # 0.8 + 0.2 / 5
    purple_hexagon = {"objects": [{"shape": "hexagon", "color": "purple", "size": "large", "position": "left"}], "template": 5}
    assert twin_share(purple_hexagon, 1.0) == 0.0
    rng = random.Random(1)
    for _ in range(200):
        text = hard_negative_caption(purple_hexagon, rng, lookalike=1.0)
        assert (named(text, SHAPES)[0], named(text, COLORS)[0]) != ("circle", "purple"), text


def test_hard_negatives_enter_the_loss_and_the_training_step(shapes_dir):
    from unclip.modules.clip_pretrain import contrastive_loss_with_negatives

    z = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    plain = contrastive_loss_with_negatives(z, z, z, z, z[:0], scale)
    far = contrastive_loss_with_negatives(z, z, z, z, -z, scale)
    near = contrastive_loss_with_negatives(z, z, z, z, F.normalize(z + 0.05 * torch.randn(4, 8), dim=-1), scale)
    assert far - plain < 0.01 and near - plain > 0.1  # an opposite negative costs next to nothing, a close one a lot

    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["image", "caption", "meta"], batch_size=8,
                                image_size=64, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = ClipPretrainModule("unclip-tiny", hard_negatives=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and module.model.token_embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hard_negatives=true needs every sample's attributes"):
        module.training_step({**batch, "meta": [{}] * len(batch["caption"])}, 0)


def test_image_negatives_enter_the_loss_and_the_training_step(shapes_dir):
    from unclip.modules.clip_pretrain import contrastive_loss_with_negatives

    z = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(10.0)
    plain = contrastive_loss_with_negatives(z, z, z, z, z[:0], scale)
    near = contrastive_loss_with_negatives(z, z, z, z, z[:0], scale, all_neg_img=F.normalize(z + 0.05 * torch.randn(4, 8), dim=-1))
    assert near - plain > 0.1  # a caption must now also rank a near copy of its image below the image itself

    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["image", "caption", "meta"], batch_size=8,
                                image_size=64, shuffle=False)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    module = ClipPretrainModule("unclip-tiny", hard_negatives=True, image_negatives=0.5)
    negatives = module.counterfactual_images(batch["image"], batch["meta"])
    assert negatives.shape == (4, *batch["image"].shape[1:]) and negatives.min() >= -1 and negatives.max() <= 1
    # each is one of the batch's images with one outline changed: a few of its pixels differ, not none
    changed = ((negatives[:, None] - batch["image"][None]).abs().amax(2) > 1 / 127.5).float().mean((-2, -1))  # (4, 8)
    assert torch.all(changed.min(1).values > 0) and torch.all(changed.min(1).values < 0.1)
    without = ClipPretrainModule("unclip-tiny", hard_negatives=True)
    without.load_state_dict(module.state_dict())
    loss = module.training_step(batch, 0)
    assert loss > without.training_step(batch, 0)  # the same batch, four more images to rank below the true one
    loss.backward()
    assert torch.isfinite(loss) and module.model.visual.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="image_negatives needs every sample's attributes"):
        ClipPretrainModule("unclip-tiny", image_negatives=0.5).training_step({**batch, "meta": [{}] * len(batch["caption"])}, 0)
    with pytest.raises(ValueError, match="image_negatives is the share"):
        ClipPretrainModule("unclip-tiny", image_negatives=2)


def test_drawn_images_are_the_counterfactuals_kept_within_their_budget(shapes_dir):
    """The memo returns exactly what counterfactual_image draws, draws a repeat once, and drops the least
    recently used image once its budget is spent."""
    from unclip.data.shapes import counterfactual_image
    from unclip.modules.clip_pretrain import DrawnImages

    dm = CaptionImageDataModule(train=str(shapes_dir / "train-*.tar"), fields=["meta"], batch_size=4, shuffle=False)
    dm.setup()
    metas = next(iter(dm.train_dataloader()))["meta"]
    asks = [(meta, 0, "star" if meta["objects"][0]["shape"] != "star" else "square") for meta in metas]
    one = np.asarray(counterfactual_image(*asks[0])).nbytes
    drawn = DrawnImages(budget_bytes=2 * one)
    for ask in asks:
        np.testing.assert_array_equal(drawn(*ask), np.asarray(counterfactual_image(*ask)))
    assert len(drawn.arrays) == 2 and drawn.used == 2 * one  # four drawn, the two oldest dropped
    kept = drawn.arrays[DrawnImages.key(*asks[-1])]
    assert drawn(*asks[-1]) is kept  # a repeat is not drawn again
    assert DrawnImages.key(*asks[0]) != DrawnImages.key(metas[0], 0, "circle")


def test_text_tower_on_captions_cut_by_length_equals_open_clips_encode_text():
    """The training step's text tower runs on captions sorted by length and cut after each group's longest: for a
    causal tower pooled at end-of-text this is the same function, values and gradients alike."""
    from unclip.modules.clip_pretrain import encode_text_by_length, plain_attention_blocks, trimmable_text_tower

    torch.manual_seed(0)
    module = ClipPretrainModule("unclip-tiny")
    assert module.trim_text and trimmable_text_tower(module.model)
    captions = ["a red circle", "a large red circle in the left and a large blue square in the right", "box",
                "top left: tiny crimson disc", "a picture of a medium-sized lemon five-pointed star in the upper right"]
    tokens = module.tokenizer(captions)
    assert int((tokens != 0).sum(1).min()) < 8 < int((tokens != 0).sum(1).max())  # lengths really differ
    full = module.model.encode_text(tokens, normalize=True)
    for groups in (1, 2, 3):
        cut = encode_text_by_length(module.model, tokens, groups)
        torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-4)
    # the blocks run with the project's attention (plain matmuls when training on a CPU): same gradients
    assert plain_attention_blocks(module.model.transformer)
    weights = torch.randn_like(full)
    leaves = (module.model.token_embedding.weight, module.model.transformer.resblocks[0].attn.in_proj_weight)
    grad_full = torch.autograd.grad((full * weights).sum(), leaves)
    grad_cut = torch.autograd.grad((encode_text_by_length(module.model, tokens) * weights).sum(), leaves)
    for cut, whole in zip(grad_cut, grad_full):
        torch.testing.assert_close(cut, whole, atol=1e-5, rtol=1e-4)
    # a tower that attends both ways cannot be cut: the module then runs open_clip's own forward
    module.model.attn_mask = torch.zeros_like(module.model.attn_mask)
    assert not trimmable_text_tower(module.model)
