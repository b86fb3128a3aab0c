"""``python -m unclip.convert kind=karlo``: a tiny random karlo release in diffusers' layout (prior, decoder with
text_proj, super_res_first/last, their schedulers) becomes published_prior, published_decoder and
published_upsampler stages whose nets equal diffusers' modules, whose guided decoder step equals the one
``UnCLIPPipeline`` takes, and whose whole stack run by unclip's ``UnCLIPPipeline`` gives diffusers' images."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from test_convert import TINY_CLIP, tiny_published_prior, write_published
from unclip.convert import ConversionError, convert
from unclip.diffusion import ddpm_step
from unclip.loading import load
from unclip.pipeline import UnCLIPPipeline

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel  # noqa: E402

CAPTIONS = ["a red circle", "two blue squares on the left"]
CROSS, TIME = 32, 64  # the decoder's context width; its time embedding (4 x block_out_channels[0])


def randomised(module, seed: int):
    """Every weight random (diffusers zero-initialises output convolutions and the learned null image embedding)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return module.eval()


def tiny_decoder():
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=CROSS, attention_head_dim=8, resnet_time_scale_shift="scale_shift", class_embed_type="identity")
    proj = UnCLIPTextProjModel(clip_embeddings_dim=128, time_embed_dim=TIME, cross_attention_dim=CROSS)
    return randomised(unet, 1), randomised(proj, 2)


def tiny_super_res(seed: int):
    return randomised(diffusers.UNet2DModel(
        sample_size=32, in_channels=6, out_channels=3, layers_per_block=1, block_out_channels=(16, 32), norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
        add_attention=False, resnet_time_scale_shift="scale_shift"), seed)


def write_karlo(folder):
    """karlo-v1-alpha's layout at tiny sizes: decoder 8 px, super-resolution 8 -> 32 (karlo's factor 4)."""
    prior = tiny_published_prior()
    write_published(folder, prior)
    unet, proj = tiny_decoder()
    unet.save_pretrained(folder / "decoder")
    proj.save_pretrained(folder / "text_proj")
    diffusers.UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon").save_pretrained(folder / "decoder_scheduler")
    first, last = tiny_super_res(3), tiny_super_res(4)
    first.save_pretrained(folder / "super_res_first")
    last.save_pretrained(folder / "super_res_last")
    diffusers.UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon").save_pretrained(folder / "super_res_scheduler")
    return {"prior": prior, "decoder": unet, "text_proj": proj, "super_res_first": first, "super_res_last": last}


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("karlo_release")
    modules = write_karlo(folder)
    out = convert("karlo", folder, folder / "stages", **TINY_CLIP)
    return {"folder": folder, "out": out, **modules}


def exact(scheduler):
    """UnCLIPScheduler with its tables in float64 (as unclip's): its float32 ``1 - betas`` moves the last steps'
    coefficients by ~1e-3 relative (see tests/test_convert.py::reference_scheduler)."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1 - scheduler.betas
    scheduler.alphas_cumprod = scheduler.alphas.cumprod(0)
    scheduler.one = scheduler.one.double()
    return scheduler


def published_text(clip, captions):
    """What diffusers' pipeline hands text_proj: CLIP's raw text embedding, its last hidden states, the mask."""
    text = clip.encode_text(captions)
    return text.pooled, text.tokens, text.mask


# ------------------------------------------------------------------------------------------- nets
def test_the_converted_decoder_net_equals_text_proj_and_the_unet(karlo, tiny_clip):
    module = load(karlo["out"] / "decoder.ckpt", clip=tiny_clip)
    assert module.kind == "published_decoder" and module.hparams["clip"] == {
        "model": "unclip-tiny", "pretrained": None, "sha256": None, "dim": 128, "random_init_seed": 0}
    z_img = torch.randn(2, 128) * 3
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([999, 40])
    text, mask = module.text_condition(CAPTIONS)
    ours = module.net(x, t, z_img, text, mask)
    z_txt, tokens, tmask = published_text(tiny_clip, CAPTIONS)
    with torch.no_grad():
        context, added = karlo["text_proj"](image_embeddings=z_img, prompt_embeds=z_txt, text_encoder_hidden_states=tokens,
                                            do_classifier_free_guidance=False)
        theirs = karlo["decoder"](x, t, encoder_hidden_states=context, class_labels=added,
                                  attention_mask=F.pad(tmask, (4, 0), value=True)).sample
    print(f"max |decoder net - text_proj + UNet2DConditionModel|: {(ours - theirs).abs().max():.2e}")
    assert ours.shape == (2, 6, 8, 8) and (ours - theirs).abs().max() <= 1e-5
    # a dropped condition is text_proj's learned null image embedding and the empty prompt, as in the pipeline
    module.set_null()
    drop = torch.tensor([True, False])
    dropped = module.net(x, t, z_img, text, mask, drop, drop)
    empty = published_text(tiny_clip, [""])
    with torch.no_grad():
        context, added = karlo["text_proj"](image_embeddings=z_img[1:], prompt_embeds=empty[0].repeat(2, 1),
                                            text_encoder_hidden_states=empty[1].repeat(2, 1, 1),
                                            do_classifier_free_guidance=True)  # rows: [null image + "", z_img + ""]
        null = karlo["decoder"](x[:1], t[:1], encoder_hidden_states=context[:1], class_labels=added[:1],
                                attention_mask=F.pad(empty[2], (4, 0), value=True)).sample
    assert (dropped[:1] - null).abs().max() <= 1e-5 and torch.allclose(dropped[1:], ours[1:], atol=1e-6)


def test_the_converted_upsampler_net_is_first_then_last(karlo):
    module = load(karlo["out"] / "upsampler.ckpt")
    assert module.kind == "published_upsampler" and module.factor == 4 and module.hparams["clip"]["model"] == "unclip-tiny"
    x, lowres = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    t = torch.tensor([500, 0, 1])  # a batch mixing both nets (training): rows go to their own
    ours = module.net(x, t, lowres=lowres)
    with torch.no_grad():
        h = torch.cat([x, lowres], 1)
        first = karlo["super_res_first"](h, t).sample
        last = karlo["super_res_last"](h, t).sample
    theirs = torch.where((t == 0).view(-1, 1, 1, 1), last, first)
    print(f"max |upsampler net - super_res_first/last|: {(ours - theirs).abs().max():.2e}")
    assert (ours - theirs).abs().max() <= 1e-5 and (first[1] - last[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------ steps
def test_one_guided_decoder_step_equals_the_unclip_pipelines(karlo, tiny_clip):
    """The decoder loop of pipeline_unclip.py for one step: the batch [uncond, cond] from text_proj with CFG (null
    image embedding, the empty prompt's embeddings), guidance on eps only, the text half's variance, then
    UnCLIPScheduler.step (learned_range, x0 clipped to [-1, 1])."""
    module = load(karlo["out"] / "decoder.ckpt", clip=tiny_clip)
    z_img = F.normalize(torch.randn(2, 128), dim=-1)
    scale, steps = 8.0, 5
    model_fn = module.model_fn(z_img, CAPTIONS, scale)
    process = module.sampler.process(module.diffusion, f"linspace{steps}")
    scheduler = exact(diffusers.UnCLIPScheduler.from_pretrained(karlo["folder"] / "decoder_scheduler"))
    scheduler.set_timesteps(steps)
    assert process.timestep_map.flip(0).tolist() == scheduler.timesteps.tolist()
    z_txt, tokens, mask = published_text(tiny_clip, CAPTIONS)
    empty_z, empty_tokens, empty_mask = (v.expand(2, *v.shape[1:]) for v in published_text(tiny_clip, [""] * 1))
    with torch.no_grad():
        context, added = karlo["text_proj"](image_embeddings=module.image_condition(z_img), prompt_embeds=torch.cat([empty_z, z_txt]),
                                            text_encoder_hidden_states=torch.cat([empty_tokens, tokens]),
                                            do_classifier_free_guidance=True)
    context_mask = F.pad(torch.cat([empty_mask, mask]), (4, 0), value=True)
    x = torch.randn(2, 3, 8, 8)
    worst = 0.0
    for i in (steps - 1, 2, 1, 0):  # the first step (t=999), a middle one, the last with noise, the last
        t = int(process.timestep_map[i])
        prev = int(process.timestep_map[i - 1]) if i else None
        ours, _ = ddpm_step(process, model_fn(x, torch.full((2,), t)), x, torch.full((2,), i),
                            torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)), module.sampler.denoise_fn())
        with torch.no_grad():
            out = karlo["decoder"](torch.cat([x, x]), t, encoder_hidden_states=context, class_labels=added,
                                   attention_mask=context_mask).sample
        (eps_u, _), (eps_c, variance) = (half.split(3, dim=1) for half in out.chunk(2))
        guided = torch.cat([eps_u + scale * (eps_c - eps_u), variance], dim=1)
        theirs = scheduler.step(guided, t, x, prev_timestep=prev, generator=torch.Generator().manual_seed(i)).prev_sample
        worst = max(worst, float((ours - theirs).abs().max()))
    print(f"max |ours - diffusers| over 4 guided decoder steps: {worst:.2e}")
    assert worst <= 1e-5


# ----------------------------------------------------------------------------------- whole stack
class OpenClipTokenizer:
    """What UnCLIPPipeline asks of a tokenizer (the empty prompt of its unconditional branch), by unclip's CLIP."""

    def __init__(self, clip):
        self.clip, self.model_max_length = clip, clip.context_length

    def __call__(self, prompts, **_):
        ids = self.clip.tokenize([prompts] if isinstance(prompts, str) else prompts)
        return SimpleNamespace(input_ids=ids, attention_mask=self.clip.encode_tokens(ids).mask)


class OpenClipTextEncoder(torch.nn.Module):
    """What UnCLIPPipeline asks of CLIPTextModelWithProjection: raw text embedding and last hidden states."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    @property
    def device(self) -> torch.device:  # DiffusionPipeline asks its modules where they are
        return self.clip.device

    def forward(self, ids):
        text = self.clip.encode_tokens(ids)
        return SimpleNamespace(text_embeds=text.pooled, last_hidden_state=text.tokens)


class UnitNormPrior(torch.nn.Module):
    """The published prior as unclip's pipeline runs it, the two differences applied: z_t enters unit-norm
    (unclip's text embeddings are), and the sampled z_i leaves unit-norm, then at the decoder's image_norm."""

    def __init__(self, prior, image_norm: float):
        super().__init__()
        self.prior, self.config, self.image_norm = prior, prior.config, image_norm

    @property
    def device(self) -> torch.device:
        return self.prior.device

    def forward(self, x, timestep, proj_embedding, **kwargs):
        return self.prior(x, timestep, proj_embedding=F.normalize(proj_embedding, dim=-1), **kwargs)

    def post_process_latents(self, latents):
        return F.normalize(self.prior.post_process_latents(latents), dim=-1) * self.image_norm


def test_the_whole_converted_stack_gives_the_unclip_pipelines_images(karlo, tiny_clip):
    ours = UnCLIPPipeline.from_checkpoints(prior=karlo["out"] / "prior.ckpt", decoder=karlo["out"] / "decoder.ckpt",
                                           upsamplers=[karlo["out"] / "upsampler.ckpt"], clip=tiny_clip)
    image_norm = ours.decoder.image_norm
    stats = karlo["prior"].clip_mean.double() ** 2 + karlo["prior"].clip_std.double() ** 2
    assert image_norm == pytest.approx(float(stats.sum().sqrt()))
    out = ours.generate(CAPTIONS, n=1, seed=3, prior_steps="linspace3", decoder_steps="linspace3", upsampler_steps="linspace3")
    assert out.pixels.shape == (2, 3, 32, 32)

    schedulers = {name: exact(diffusers.UnCLIPScheduler.from_pretrained(karlo["folder"] / name))
                  for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")}
    reference = diffusers.UnCLIPPipeline(
        prior=UnitNormPrior(karlo["prior"], image_norm), decoder=karlo["decoder"], text_proj=karlo["text_proj"],
        text_encoder=OpenClipTextEncoder(tiny_clip), tokenizer=OpenClipTokenizer(tiny_clip),
        super_res_first=karlo["super_res_first"], super_res_last=karlo["super_res_last"], **schedulers)
    z_txt, tokens, mask = published_text(tiny_clip, CAPTIONS)
    theirs = reference(text_model_output=(z_txt, tokens), text_attention_mask=mask, generator=torch.Generator().manual_seed(3),
                       prior_num_inference_steps=3, decoder_num_inference_steps=3, super_res_num_inference_steps=3,
                       prior_guidance_scale=4.0, decoder_guidance_scale=8.0, output_type="np").images
    theirs = torch.from_numpy(theirs).permute(0, 3, 1, 2)  # (B, H, W, 3) in [0, 1]
    ours_01 = out.pixels.add(1).div(2).clamp(0, 1)  # the pipeline's image * 0.5 + 0.5, clamped
    print(f"max |unclip pipeline - diffusers UnCLIPPipeline| over the whole stack: {(ours_01 - theirs).abs().max():.2e}")
    assert (ours_01 - theirs).abs().max() <= 1e-4
    assert out.pixels.std() > 0.05  # pictures, not a constant


def test_the_converted_decoder_runs_unclips_samplers_and_modes(karlo, tiny_clip):
    pipe = UnCLIPPipeline.from_checkpoints(prior=None, decoder=karlo["out"] / "decoder.ckpt",
                                           upsamplers=[karlo["out"] / "upsampler.ckpt"], clip=tiny_clip)
    assert pipe.image_size == 32
    z_img = F.normalize(torch.randn(2, 128), dim=-1)
    for kind in ("ddim", "dpmpp_2m", "unipc"):
        pipe.decoder.sampler.kind = kind
        x = pipe.decoder.sample(z_img, CAPTIONS, torch.Generator().manual_seed(0), steps="trailing4")
        assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all() and x.std() > 0.05, kind
    varied = pipe.vary(x[:1], n=2, decoder_steps=3, upsampler_steps=2)  # no caption: the empty prompt's
    assert varied.pixels.shape == (2, 3, 32, 32) and torch.isfinite(varied.pixels).all()


# ------------------------------------------------------------------------------------- bad input
def test_missing_parts_and_mismatched_weights_are_named_and_nothing_is_written(karlo, tmp_path):
    import json
    import shutil

    partial = tmp_path / "partial"
    shutil.copytree(karlo["folder"], partial, ignore=shutil.ignore_patterns("stages", "text_proj"))
    out = tmp_path / "out"
    with pytest.raises(ConversionError, match=r"has no text_proj/ \(the decoder's UnCLIPTextProjModel\)"):
        convert("karlo", partial, out, **TINY_CLIP)
    assert not out.exists()  # part=all: the prior converted, the decoder failed, so neither was written
    shutil.rmtree(partial / "decoder")
    with pytest.raises(ConversionError, match=r"has no decoder/ \(karlo's decoder"):
        convert("karlo", partial, out / "decoder.ckpt", part="decoder", **TINY_CLIP)
    assert not out.exists()
    # all: the stages whose folders are there (here prior and upsampler)
    convert("karlo", partial, out, **TINY_CLIP)
    assert sorted(p.name for p in out.iterdir()) == ["prior.ckpt", "upsampler.ckpt"]

    mismatched = tmp_path / "mismatched"
    shutil.copytree(karlo["folder"], mismatched, ignore=shutil.ignore_patterns("stages"))
    config = json.loads((mismatched / "super_res_last" / "config.json").read_text())
    (mismatched / "super_res_last" / "config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    with pytest.raises(ConversionError, match=r"weights of .*super_res_last do not match its config: missing .*resnets\.1"):
        convert("karlo", mismatched, tmp_path / "m", **TINY_CLIP)
    with pytest.raises(ConversionError, match="gives 3 stages .* but out=.*one.ckpt is one file"):
        convert("karlo", karlo["folder"], tmp_path / "one.ckpt", part="all", **TINY_CLIP)
    with pytest.raises(ConversionError, match="text_proj in .* reads embeddings and token states of width 128, but CLIP "
                                              "ViT-L-14 gives embed_dim 768"):
        convert("karlo", karlo["folder"], tmp_path / "d.ckpt", part="decoder")
    assert not (tmp_path / "m").exists() and not any(tmp_path.glob("*.ckpt")) and not any(tmp_path.rglob(".*partial*"))


def test_the_prior_only_usage_is_unchanged(karlo, tmp_path):
    path = convert("karlo", karlo["folder"], tmp_path / "karlo.ckpt", **TINY_CLIP)  # out=FILE.ckpt: the prior, as before
    assert torch.load(path, weights_only=True)["hyper_parameters"]["kind"] == "published_prior"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["karlo.ckpt"]
