"""The decoder: UNet shapes, z_i conditioning, CFG dropout rates, overfitting, DDIM and solver decoding, the CLI run."""

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from test_train_cli import common, run_cli
from unclip.diffusion import Sampler
from unclip.loading import build_stage
from unclip.modules.decoder import DecoderModule
from unclip.nets.unet import UNet
from helpers import fixed_loss, logged_keys, train_steps

DIFFUSION = dict(schedule="cosine", num_timesteps=100, prediction="eps")
SAMPLER = dict(kind="ddim", steps=5, clip_denoised=True)


def tiny_unet_config(**kw):
    return {**dict(image_size=16, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[8],
                   head_channels=16, embed_dim=128, groups=8), **kw}


def randomise_zero_layers(net: nn.Module) -> nn.Module:
    """Output layers start at zero (every branch the identity); tests that probe inputs need them live."""
    torch.manual_seed(0)
    for p in net.parameters():
        if torch.all(p == 0):
            nn.init.normal_(p, std=0.05)
    return net


@pytest.mark.parametrize("config", [
    dict(image_size=16, channel_mult=[1, 2]),
    dict(image_size=32, channel_mult=[1, 2, 2], attention_resolutions=[16, 8]),
    dict(image_size=32, channel_mult=[1, 1, 2, 3], num_res_blocks=2, learn_sigma=True),
    dict(image_size=16, channel_mult=[1, 2], text_width=24),
    dict(image_size=16, channel_mult=[1, 2], embed_dim=0, lowres_channels=3),
    dict(image_size=32, channel_mult=[1, 2], patch_size=2, attention_resolutions=[8]),   # 2x2 patches: a 16 x 16 grid
    dict(image_size=16, channel_mult=[1, 2], embed_dim=0, lowres_channels=3, patch_size=4),
])
def test_unet_shapes(config):
    net = UNet(tiny_unet_config(**config))
    b, s = 2, config["image_size"]
    x, t = torch.randn(b, 3, s, s), torch.randint(0, 1000, (b,))
    z = torch.randn(b, 128) if config.get("embed_dim", 128) else None
    tokens = torch.randn(b, 5, 24) if config.get("text_width") else None
    mask = torch.ones(b, 5, dtype=torch.bool) if tokens is not None else None
    lowres = torch.randn(b, 3, s, s) if config.get("lowres_channels") else None
    out = net(x, t, z, tokens, mask, lowres=lowres)
    assert out.shape == (b, 6 if config.get("learn_sigma") else 3, s, s)


def test_patches_keep_pixels_apart():
    """With 2x2 patches every output pixel still depends on its own input pixel (the patching is lossless)."""
    net = randomise_zero_layers(UNet(tiny_unet_config(image_size=16, patch_size=2, attention_resolutions=[]))).eval()
    x, t, z = torch.zeros(1, 3, 16, 16, requires_grad=True), torch.tensor([10]), torch.randn(1, 128)
    net(x, t, z)[0, :, 5, 6].sum().backward()
    assert x.grad[0, :, 5, 6].abs().sum() > 0 and x.grad[0, :, 4, 6].abs().sum() > 0  # its own pixel and its patch mate


def test_image_embedding_and_caption_change_the_prediction():
    net = randomise_zero_layers(UNet(tiny_unet_config(text_width=24))).eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    z, tokens, mask = torch.randn(2, 128), torch.randn(2, 5, 24), torch.ones(2, 5, dtype=torch.bool)
    base = net(x, t, z, tokens, mask)
    assert not torch.allclose(base, net(x, t, torch.zeros_like(z), tokens, mask), atol=1e-4)  # zeroing z_i changes eps
    assert not torch.allclose(base, net(x, t, z, torch.randn_like(tokens), mask), atol=1e-4)
    dropped = torch.ones(2, dtype=torch.bool)
    # dropped conditions are invisible: any z_i / caption gives the same unconditional prediction
    torch.testing.assert_close(net(x, t, z, tokens, mask, dropped, dropped),
                               net(x, t, torch.randn_like(z), torch.randn_like(tokens), mask, dropped, dropped))


def test_caption_embedding_keeps_apart_words_the_clip_text_tower_merges(tiny_clip):
    """With caption_embedding each caption token id gets its own learned vector on top of CLIP's state: it starts at
    zero (the CLIP-only decoder), training moves the rows of the words it saw, and the stage loads back with it."""
    module = DecoderModule(tiny_unet_config(text_width=tiny_clip.text_width), DIFFUSION, SAMPLER, clip=tiny_clip,
                           text_cond=True, text_drop_prob=0.0, caption_embedding=True)
    plain = DecoderModule(tiny_unet_config(), DIFFUSION, SAMPLER, clip=tiny_clip, text_cond=True)
    captions = ["a red circle", "a red hexagon"]
    states = [plain.text_condition(captions)[0], module.text_condition(captions)[0]]
    torch.testing.assert_close(states[0], states[1])  # zero at first
    randomise_zero_layers(module.net)  # the rest of the net live, so gradients reach the captions' rows
    nn.init.zeros_(module.net.caption_embedding.weight)
    batch = {"image": torch.zeros(2, 3, 16, 16), "img_emb": torch.randn(2, 128), "caption": captions}
    module.train()
    module.loss(batch).backward()
    grad = module.net.caption_embedding.weight.grad
    ids = tiny_clip.tokenize(captions)
    moved = grad.abs().sum(-1).nonzero().flatten()
    assert set(moved.tolist()) == set(ids[ids != 0].tolist())  # exactly the rows of the captions' tokens
    hexagon = int(ids[1, 3])
    with torch.no_grad():
        module.net.caption_embedding.weight[hexagon] = 1.0
    tokens = module.text_condition(captions)[0]
    torch.testing.assert_close(tokens[0], states[0][0])
    assert (tokens[1, 3] - states[0][1, 3]).abs().min() > 0.99 and torch.equal(tokens[1, :3], states[0][1, :3])
    loaded = build_stage({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()},
                         Path("decoder.ckpt"), clip=tiny_clip)
    torch.testing.assert_close(loaded.text_condition(captions)[0], tokens)  # the stage rebuilds with its embedding


class RecordingNet(nn.Module):
    """Stands in for the UNet to see which conditions the training step drops."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, z, tokens, mask, drop_image, drop_text):
        self.drops = (drop_image, drop_text)
        return x * self.weight


def test_condition_dropout_rates(tiny_clip):
    module = DecoderModule(tiny_unet_config(), DIFFUSION, SAMPLER, clip=tiny_clip, text_cond=True)
    module.net = RecordingNet(module.net.config)
    n = 4000
    batch = {"image": torch.zeros(n, 3, 4, 4), "img_emb": torch.randn(n, 128), "caption": ["a red circle"] * n}
    torch.manual_seed(0)
    module.train()
    module.loss(batch)
    drop_image, drop_text = module.net.drops
    assert abs(drop_image.float().mean().item() - 0.1) < 0.02 and abs(drop_text.float().mean().item() - 0.5) < 0.03
    module.eval()
    module.loss(batch)
    assert not module.net.drops[0].any() and not module.net.drops[1].any()  # validation keeps every condition


def test_image_noise_moves_training_embeddings_off_the_data_and_leaves_validation_alone(tiny_clip):
    seen = []

    class RecordingEmbeddings(RecordingNet):
        def forward(self, x, t, z, tokens, mask, drop_image, drop_text):
            seen.append(z)
            return x * self.weight

    module = DecoderModule(tiny_unet_config(), DIFFUSION, SAMPLER, clip=tiny_clip, image_noise=0.5)
    module.net = RecordingEmbeddings(module.net.config)
    n = 2000
    z_img = torch.randn(n, 128)
    batch = {"image": torch.zeros(n, 3, 4, 4), "img_emb": z_img, "caption": [""] * n}
    torch.manual_seed(0)
    module.train()
    module.loss(batch)
    cos = F.cosine_similarity(seen[-1], z_img, dim=-1)
    # levels uniform in [0, 0.5]: cos 1/sqrt(1 + level^2) between 0.89 and 1, about 0.96 on average
    assert cos.min() > 0.8 and cos.max() > 0.999 and 0.93 < cos.mean() < 0.99
    torch.testing.assert_close(seen[-1].norm(dim=-1), torch.full((n,), 128 ** 0.5))  # the net's scale is kept
    module.eval()
    module.loss(batch)
    torch.testing.assert_close(F.cosine_similarity(seen[-1], z_img, dim=-1), torch.ones(n))


def test_tiny_decoder_overfits_a_few_images(tiny_clip):
    torch.manual_seed(0)
    module = DecoderModule(tiny_unet_config(), DIFFUSION, SAMPLER, clip=tiny_clip, image_drop_prob=0.0)
    images = torch.zeros(4, 3, 16, 16)
    for i, (r, g, b) in enumerate([(1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1)]):
        images[i, :, 4 + i: 10 + i, 4:12] = torch.tensor([r, g, b], dtype=torch.float)[:, None, None]
    batch = {"image": images, "img_emb": torch.randn(4, 128), "caption": [""] * 4}
    optimizer = torch.optim.Adam(module.net.parameters(), lr=2e-3)

    before = fixed_loss(module, batch)
    train_steps(module, batch, optimizer, 150)
    assert fixed_loss(module, batch) < 0.3 * before


def test_ddim_decoding_runs_with_guidance_and_is_seeded(tiny_clip):
    module = DecoderModule(tiny_unet_config(), DIFFUSION, SAMPLER, clip=tiny_clip)
    randomise_zero_layers(module.net).eval()
    z = torch.nn.functional.normalize(torch.randn(3, 128), dim=-1)
    a = module.sample(z, generator=torch.Generator().manual_seed(0), guidance_scale=3.0)
    b = module.sample(z, generator=torch.Generator().manual_seed(0), guidance_scale=3.0)
    assert a.shape == (3, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, module.sample(z, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
def test_fast_solvers_decode_through_the_sampler_config(tiny_clip, kind):
    """A learned-variance decoder, guided and clamped, decodes with the solver its sampler config names."""
    module = DecoderModule(tiny_unet_config(learn_sigma=True), {**DIFFUSION, "variance": "learned_range"},
                           {**SAMPLER, "kind": kind}, clip=tiny_clip)
    randomise_zero_layers(module.net).eval()
    z = torch.nn.functional.normalize(torch.randn(2, 128), dim=-1)
    a = module.sample(z, generator=torch.Generator().manual_seed(0), guidance_scale=3.0)
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, module.sample(z, generator=torch.Generator().manual_seed(0), guidance_scale=3.0))
    module.sampler = Sampler(**SAMPLER)  # DDIM, the same steps: a different loop, a different image
    assert not torch.allclose(a, module.sample(z, generator=torch.Generator().manual_seed(0), guidance_scale=3.0))


@pytest.mark.slow
def test_decoder_trains_from_image_shards_and_logs_grids(shapes_dir, embed_cfg, cache_dir):
    root = Path(embed_cfg.paths.root)
    args = common(shapes_dir, root) + ["model=decoder", "clip=unclip_tiny", "run.name=dec", "model.image_size=16",
                                       "model.module.net.channels=16", "model.module.net.channel_mult=[1,2]",
                                       "model.module.val_images=4", "sampler.steps=3", "diffusion.num_timesteps=50",
                                       "trainer.max_steps=2", "trainer.limit_val_batches=1", "data.batch_size=4"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "runs" / "shapes" / "decoder" / "dec"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["val_step0000002.png", "val_unseen_step0000002.png"]
    keys = logged_keys(run)
    assert {"val/decoder/clip_sim", "val/decoder/clip_sim_real", "val/decoder/clip_sim_unseen", "val/loss"} <= keys
    published = torch.load(root / "artifacts" / "decoder" / "shapes.ckpt", map_location="cpu", weights_only=True)
    assert published["hyper_parameters"]["kind"] == "decoder" and published["hyper_parameters"]["net"]["image_size"] == 16


def test_a_channels_last_unet_computes_what_the_plain_one_does_and_keeps_its_weights():
    config = {**tiny_unet_config(embed_dim=16), "text_width": 8}
    torch.manual_seed(0)
    plain = UNet(config)
    for p in plain.parameters():  # zero-initialised output layers would hide any difference
        nn.init.normal_(p, std=0.05)
    fast = UNet({**config, "channels_last": True})
    fast.load_state_dict(plain.state_dict())
    assert fast.input.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    z, tokens, mask = torch.randn(2, 16), torch.randn(2, 5, 8), torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool()
    out_plain, out_fast = plain(x, t, z, tokens, mask), fast(x, t, z, tokens, mask)
    assert torch.allclose(out_plain, out_fast, atol=1e-5)
    out_plain.square().sum().backward()
    out_fast.square().sum().backward()
    pairs = [(a.grad, b.grad) for a, b in zip(plain.parameters(), fast.parameters()) if a.grad is not None or b.grad is not None]
    assert pairs and all(a is not None and b is not None and torch.allclose(a, b, atol=1e-4) for a, b in pairs)
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_a_unet_reads_checkpoints_whose_attention_projections_were_1x1_convolutions():
    """Decoders trained before the attention's q, k, v and output maps became linear layers stored them as
    (out, in, 1) Conv1d weights: such a state dict loads, strictly, into the same function."""
    torch.manual_seed(0)
    net = UNet({**tiny_unet_config(embed_dim=16), "channels_last": True})
    for p in net.parameters():
        nn.init.normal_(p, std=0.05)
    old = {k: v[..., None] if k.endswith(("attn.qkv.weight", "attn.proj.weight")) else v for k, v in net.state_dict().items()}
    assert sum(v.dim() == 3 for v in old.values()) >= 2
    loaded = UNet(tiny_unet_config(embed_dim=16))
    loaded.load_state_dict(old)
    x, t, z = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.randn(2, 16)
    torch.testing.assert_close(loaded(x, t, z), net(x, t, z), atol=1e-5, rtol=1e-5)


def test_unet_attention_equals_the_textbook_formula_and_feeds_the_fused_kernel_contiguous_heads(monkeypatch):
    """Pixels and context tokens attend as softmax(q kᵀ/√d) v with the block's per-pixel linear maps as q, k, v;
    the fused kernel gets q, k, v with the head dimension contiguous (else a CPU falls back to the math path)."""
    import torch.nn.functional as F

    from unclip.nets.unet import AttentionBlock

    torch.manual_seed(0)
    block = randomise_zero_layers(AttentionBlock(32, 16, context_dim=24, groups=8))
    x, context = torch.randn(2, 32, 4, 4), torch.randn(2, 3, 24)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    qkv = F.conv1d(block.norm(x).flatten(2), block.qkv.weight[..., None], block.qkv.bias).view(2, 3, 2, 16, 16)
    q, k, v = (part.transpose(-1, -2) for part in qkv.unbind(1))          # (B, heads, HW, d)
    ck, cv = block.context_kv(context).view(2, 3, 2, 2, 16).permute(2, 0, 3, 1, 4)
    k, v = torch.cat([ck, k], 2), torch.cat([cv, v], 2)
    scores = (q @ k.transpose(-1, -2)) / 4.0
    keys_valid = torch.cat([valid, torch.ones(2, 16, dtype=torch.bool)], 1)[:, None, None]
    y = scores.masked_fill(~keys_valid, float("-inf")).softmax(-1) @ v
    expected = x + F.conv1d(y.transpose(-1, -2).reshape(2, 32, 16), block.proj.weight[..., None], block.proj.bias).view_as(x)
    strides = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: (strides.append((q.stride(-1), k.stride(-1), v.stride(-1))), real(q, k, v, **kw))[1])
    with torch.no_grad():
        torch.testing.assert_close(block(x, context, valid), expected, atol=1e-5, rtol=1e-5)
    assert strides == [(1, 1, 1)]
    torch.testing.assert_close(block(x, context, valid), expected, atol=1e-5, rtol=1e-5)  # training: two matmuls
