"""The upsamplers: aligned crop pairs, degradations, noise augmentation, shapes, conditioning, a loss that
falls, ``upsample()``, and the CLI run with its PSNR/SSIM against bicubic."""


import pytest
import torch

from test_decoder import randomise_zero_layers
from test_train_cli import common, run_cli
from unclip.degradations import JPEG, BSRLite, GaussianBlur, GaussianNoise, RandomOrder, resize
from unclip.modules.upsampler import UpsamplerModule
from helpers import fixed_loss, logged_keys, train_steps

DIFFUSION = dict(schedule="cosine", num_timesteps=100, prediction="eps")
SAMPLER = dict(kind="ddim", steps=4, clip_denoised=True)
BLUR = {"_target_": "unclip.degradations.GaussianBlur", "sigma": [0.8, 1.0], "prob": 1.0}


def tiny_upsampler(image_size=32, lowres_size=16, crop_size=16, noise_aug=None, diffusion=DIFFUSION, embed_dim=None, **kw):
    net = dict(image_size=image_size, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
               middle_attention=False, groups=8, **({"embed_dim": embed_dim} if embed_dim else {}))
    return UpsamplerModule(net, diffusion, SAMPLER, lowres_size=lowres_size, crop_size=crop_size, noise_aug=noise_aug, **kw)


def shapes_batch(n=4, size=32, seed=0):
    """Flat backgrounds with coloured rectangles: sharp edges, like the shapes data."""
    g = torch.Generator().manual_seed(seed)
    images = (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1).expand(n, 3, size, size).clone()
    for i in range(n):
        top, left = torch.randint(0, size // 2, (2,), generator=g).tolist()
        images[i, :, top:top + size // 3, left:left + size // 2] = torch.rand(3, 1, 1, generator=g) * 2 - 1
    return images


# ------------------------------------------------------------------------------------------ pairs
@pytest.mark.parametrize("downsample", ["area", "bicubic"])
def test_pairs_are_aligned_crops_of_the_downsampled_image(downsample):
    module = tiny_upsampler(image_size=32, lowres_size=8, crop_size=16, downsample=downsample)
    images = torch.rand(16, 3, 32, 32) * 2 - 1
    torch.manual_seed(0)
    pair = module.training_pair(images)
    assert pair["x0"].shape == pair["cond"].shape == (16, 3, 16, 16) and pair["lowres"].shape == (16, 3, 4, 4)
    assert pair["aug_level"] is None and (pair["offsets"] % 4 == 0).all() and len(set(map(tuple, pair["offsets"].tolist()))) > 1
    lowres_full = resize(images, 8, downsample)
    cond_full = resize(lowres_full, 32, "bicubic", clamp=False)
    for i, (top, left) in enumerate(pair["offsets"].tolist()):
        torch.testing.assert_close(pair["x0"][i], images[i, :, top:top + 16, left:left + 16])
        torch.testing.assert_close(pair["lowres"][i], lowres_full[i, :, top // 4:top // 4 + 4, left // 4:left // 4 + 4])
        torch.testing.assert_close(pair["cond"][i], cond_full[i, :, top:top + 16, left:left + 16])
    if downsample == "area":  # a box filter commutes with grid-aligned crops: the low-res crop IS the crop, downsampled
        torch.testing.assert_close(pair["lowres"], resize(pair["x0"], 4, "area"))


def test_degradation_corrupts_the_training_condition_only():
    module = tiny_upsampler(degradation=BLUR)
    images = shapes_batch(8)
    torch.manual_seed(0)
    clean = module.training_pair(images, degrade=False)
    torch.manual_seed(0)
    blurred = module.training_pair(images)
    torch.testing.assert_close(blurred["x0"], clean["x0"])  # same crops, same target
    tv = lambda x: (x.diff(dim=-1).abs().mean() + x.diff(dim=-2).abs().mean()).item()  # noqa: E731
    assert tv(blurred["lowres"]) < 0.8 * tv(clean["lowres"])
    assert module.hparams["degradation"] == BLUR  # a plain dict in the checkpoint, rebuilt on load


def test_noise_augmentation_draws_levels_and_noises_the_condition():
    module = tiny_upsampler(noise_aug={"max_step": 60, "sample_step": 10})
    torch.manual_seed(0)
    pair = module.training_pair(shapes_batch(64))
    levels = pair["aug_level"]
    assert levels.min() >= 0 and levels.max() <= 60 and len(levels.unique()) > 20
    clean = resize(pair["lowres"], 16, "bicubic", clamp=False)
    error = (pair["cond"] - clean).pow(2).flatten(1).mean(1)
    assert torch.corrcoef(torch.stack([error, levels.float()]))[0, 1] > 0.8  # higher level, noisier condition
    with pytest.raises(ValueError, match="sample_step"):
        tiny_upsampler(noise_aug={"max_step": 60, "sample_step": 80})


def test_a_residual_upsampler_diffuses_the_difference_to_bicubic_and_starts_there():
    module = tiny_upsampler(residual=True, diffusion=dict(DIFFUSION, prediction="x0"))
    images = shapes_batch(4)
    torch.manual_seed(0)
    pair = module.training_pair(images)
    lowres = module.lowres_of(images)
    bicubic = resize(lowres, 32, "bicubic")
    for i, (top, left) in enumerate(pair["offsets"].tolist()):
        torch.testing.assert_close(pair["target"][i], pair["x0"][i] - bicubic[i, :, top:top + 16, left:left + 16])
    module.eval()  # the untrained net outputs zeros (zero-initialised output layer): x0 residual 0 = bicubic
    torch.testing.assert_close(module.upsample(lowres, generator=torch.Generator().manual_seed(0)), bicubic)


# ----------------------------------------------------------------------------------- degradations
def test_degradations_keep_shape_and_range_and_do_their_job():
    torch.manual_seed(0)
    noise = torch.rand(8, 3, 16, 16) * 2 - 1
    flat = torch.full((2, 3, 16, 16), 0.3)
    blur = GaussianBlur(sigma=1.0, prob=1.0)
    torch.testing.assert_close(blur(flat), flat)                           # a blur keeps flat colours (reflect pad)
    assert blur(noise).std() < 0.6 * noise.std()
    torch.testing.assert_close(GaussianBlur(prob=0.0)(noise), noise)
    noisy = GaussianNoise(std=0.1, prob=1.0)(flat)
    assert 0.08 < (noisy - flat).std() < 0.12
    jpeg = JPEG(quality=10, prob=1.0)(noise)
    assert not torch.allclose(jpeg, noise, atol=0.05) and (jpeg - noise).abs().mean() < 0.5
    out = BSRLite()(noise)
    assert out.shape == noise.shape and out.min() >= -1 and out.max() <= 1


def test_degradations_run_under_bf16_autocast():
    # trainer.precision=bf16-mixed: the blur's convolutions come out in bf16, the batch stays fp32
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for degrade in (GaussianBlur(sigma=1.0, prob=0.5), BSRLite()):
            torch.manual_seed(0)
            out = degrade(images)
            assert out.dtype == images.dtype and out.shape == images.shape


def test_random_order_draws_an_order_per_sample():
    halve = lambda x, g=None: x * 0.5  # noqa: E731
    shift = lambda x, g=None: x + 0.5  # noqa: E731
    torch.manual_seed(0)
    out = RandomOrder([halve, shift])(torch.zeros(64, 1, 1, 1)).flatten()
    assert set(out.tolist()) == {0.5, 0.25} and 10 < (out == 0.5).sum() < 54  # shift-then-halve and halve-then-shift


# -------------------------------------------------------------------------------- nets and sampling
@pytest.mark.parametrize("sizes", [(64, 32, 32), (32, 16, 16)])
def test_shapes_and_upsample_returns_the_target_size(sizes):
    image_size, lowres_size, crop_size = sizes
    module = tiny_upsampler(image_size, lowres_size, crop_size, noise_aug={"max_step": 50, "sample_step": 5}, degradation=BLUR)
    loss = module.loss({"image": shapes_batch(2, image_size), "key": ["a", "b"]})
    assert loss.ndim == 0 and torch.isfinite(loss)
    module.eval()
    out = module.upsample(shapes_batch(2, lowres_size), generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, image_size, image_size) and out.min() >= -1 and out.max() <= 1
    again = module.upsample(shapes_batch(2, lowres_size), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, again)
    with pytest.raises(ValueError, match="lowres must be"):
        module.upsample(torch.zeros(2, 32, 32))


def test_the_condition_and_the_augmentation_level_change_the_output():
    module = tiny_upsampler(noise_aug={"max_step": 50, "sample_step": 0})
    randomise_zero_layers(module.net).eval()
    lowres, other = shapes_batch(2, 16, seed=0), shapes_batch(2, 16, seed=1)
    sample = lambda lr, **kw: module.upsample(lr, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    base = sample(lowres)
    assert not torch.allclose(base, sample(other), atol=1e-3)
    assert not torch.allclose(base, sample(lowres, aug_level=40), atol=1e-3)
    # the level reaches the net through its embedding, not only through the noise it adds
    x, t, cond = torch.randn(2, 3, 32, 32), torch.tensor([10, 50]), resize(lowres, 32, clamp=False)
    assert not torch.allclose(module.net(x, t, lowres=cond, aug_level=torch.tensor([0, 0])),
                              module.net(x, t, lowres=cond, aug_level=torch.tensor([40, 40])), atol=1e-4)
    with pytest.raises(ValueError, match="aug_level"):
        module.net(x, t, lowres=cond)
    with pytest.raises(ValueError, match="upsampler"):
        module.net(x, t, aug_level=t)


def test_an_image_conditioned_upsampler_reads_z_i_through_the_timestep_embedding_only():
    module = tiny_upsampler(image_cond=True, embed_dim=8)
    randomise_zero_layers(module.net).eval()
    assert module.net.config.embed_dim == 8 and module.net.image_embed_to_tokens is None  # no attention: no tokens
    lowres, z = shapes_batch(2, 16), torch.randn(2, 8)
    sample = lambda **kw: module.upsample(lowres, generator=torch.Generator().manual_seed(0), **kw)  # noqa: E731
    base = sample(z_img=z)
    torch.testing.assert_close(base, sample(z_img=z * 3), atol=1e-3, rtol=0)  # the embedding's direction, not its norm
    assert not torch.allclose(base, sample(z_img=torch.randn(2, 8)), atol=1e-3)
    # without z_i it upsamples from the null embedding it learned with z_i dropped
    with torch.no_grad():
        module.net.null_image_embed.copy_(z[1] / z[1].norm() * 8 ** 0.5)  # the null embedding set to z[1], as the net reads it
    torch.testing.assert_close(sample()[1], sample(z_img=z)[1], atol=1e-3, rtol=0)
    assert not torch.allclose(sample()[0], base[0], atol=1e-3)
    # training reads the batch's z_i: its projection gets a gradient
    module.train()
    loss = module.loss({"image": shapes_batch(4), "img_emb": torch.randn(4, 8), "key": list("abcd")})
    loss.backward()
    assert module.net.image_embed_to_time.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embed_dim"):
        tiny_upsampler(image_cond=True)


def test_the_image_conditioned_upsampler_config_reads_the_cache_and_stays_convolutional():
    from test_config import compose_train

    cfg = compose_train("model=upsampler_32_64_zi")
    module = cfg.model.module
    assert module.image_cond and module.net.embed_dim == cfg.clip.embed_dim and list(cfg.model.fields) == ["image", "img_emb"]
    assert not module.net.attention_resolutions and not module.net.middle_attention and cfg.model.image_size == 64


@pytest.mark.parametrize("kind", ["dpmpp_2m", "unipc"])
def test_fast_solvers_upsample_through_the_sampler_config(kind):
    net = dict(image_size=32, channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
               middle_attention=False, groups=8)
    module = UpsamplerModule(net, DIFFUSION, {**SAMPLER, "kind": kind}, lowres_size=16, crop_size=16)
    randomise_zero_layers(module.net).eval()
    out = module.upsample(shapes_batch(2, 16), generator=torch.Generator().manual_seed(0))
    assert module.sampler.kind == kind and out.shape == (2, 3, 32, 32) and out.min() >= -1 and out.max() <= 1


def test_loss_falls_on_a_tiny_run():
    torch.manual_seed(0)
    module = tiny_upsampler(noise_aug={"max_step": 20, "sample_step": 0})
    batch = {"image": shapes_batch(8), "key": list("abcdefgh")}
    optimizer = torch.optim.Adam(module.net.parameters(), lr=5e-3)

    before = fixed_loss(module, batch)
    train_steps(module, batch, optimizer, 15)
    assert fixed_loss(module, batch) < 0.5 * before


# ---------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("model", ["upsampler_32_64", "upsampler_64_256", "upsampler_256_1024"])
def test_upsampler_configs_are_consistent(model):
    from hydra.utils import instantiate

    from test_config import compose_train
    from unclip.training import stage_kind

    cfg = compose_train(f"model={model}")
    module = cfg.model.module
    factor, levels = cfg.model.image_size // cfg.model.lowres_size, len(module.net.channel_mult)
    assert cfg.model.image_size == factor * cfg.model.lowres_size == cfg.data.image_size and stage_kind(cfg) == "upsampler"
    assert module.crop_size % factor == 0 and module.crop_size % 2 ** (levels - 1) == 0
    assert not module.net.attention_resolutions and not module.net.middle_attention and not cfg.model.needs_clip
    assert list(cfg.model.fields) == ["image"] and cfg.sampler.kind == "ddim"
    degrade = instantiate(module.degradation)
    out = degrade(torch.zeros(2, 3, 8, 8))
    assert out.shape == (2, 3, 8, 8) and isinstance(degrade, BSRLite if model == "upsampler_256_1024" else GaussianBlur)


# ------------------------------------------------------------------------------------------ CLI
@pytest.mark.slow
def test_upsampler_trains_logs_psnr_against_bicubic_and_loads(shapes_dir, tmp_path):
    args = common(shapes_dir, tmp_path) + ["model=upsampler_32_64", "clip=unclip_tiny", "run.name=up", "model.image_size=32",
                                           "model.lowres_size=16", "model.module.crop_size=16", "model.module.net.channels=16",
                                           "model.module.net.channel_mult=[1,2]", "model.module.val_images=4",
                                           "model.module.grid_images=3", "sampler.steps=3", "diffusion.num_timesteps=50",
                                           "model.module.noise_aug.max_step=20", "trainer.max_steps=2",
                                           "trainer.limit_val_batches=1", "data.batch_size=4"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "runs" / "shapes" / "upsampler_32_64" / "up"
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["val_step0000002.png", "val_unseen_step0000002.png"]
    keys = logged_keys(run)
    assert {f"val/upsampler/{m}{s}" for m in ("psnr", "ssim", "psnr_bicubic", "ssim_bicubic") for s in ("", "_unseen")} <= keys
    assert not (tmp_path / "cache").exists()  # no embedding cache, no CLIP: the upsampler needs images only

    import unclip

    module = unclip.load(tmp_path / "artifacts" / "upsampler" / "shapes.ckpt")
    assert module.hparams["kind"] == "upsampler" and (module.hparams["lowres_size"], module.hparams["image_size"]) == (16, 32)
    assert module.hparams["noise_aug"] == {"max_step": 20, "sample_step": 0} and module.hparams["crop_size"] == 16
    assert module.upsample(torch.zeros(1, 3, 16, 16), steps=2).shape == (1, 3, 32, 32)
