"""End-to-end sampling latency (prior + decoder + super-resolution) of unclip's ``UnCLIPPipeline`` next to
diffusers' ``UnCLIPPipeline`` on the same weights: a tiny random karlo release in diffusers' layout, built
here and converted by ``unclip.convert``, run by both at karlo's step counts and guidance. The fp32 images
are compared first, so the row shows the two pipelines time the same work (same nets, shapes, noise): they
agree to float32 rounding, mean |difference| ~1e-6, a few pixels up to ~1e-2, which is as far as diffusers
moves from itself when its UNets run channels_last (guidance 8 and the first steps' 1/sqrt(alpha_bar) amplify
the summation-order rounding of random nets).
"""

from __future__ import annotations

import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

PROMPTS = ["a red circle", "two blue squares on the left", "a big green triangle", "a small yellow star at the top",
           "three purple dots", "a white square on a black background", "an orange ring in the middle", "a pink heart"]
STEPS = {"prior": 25, "decoder": 25, "super_res": 7}  # karlo's UnCLIPPipeline defaults
GUIDANCE = {"prior": 4.0, "decoder": 8.0}             # the same; super-resolution runs unguided
TINY_CLIP = {"clip_model": "unclip-tiny", "clip_pretrained": "none"}  # random tiny CLIP: embed 128, 32 tokens
CLIP_DIM, CONTEXT = 128, 32
PRIOR = {"num_attention_heads": 4, "attention_head_dim": 32, "num_layers": 4}
DECODER = {"sample_size": 32, "block_out_channels": (32, 64), "cross_attention_dim": 64}
SUPER_RES = {"sample_size": 128, "block_out_channels": (16, 32)}  # 32 -> 128 px: karlo's factor 4 (64 -> 256)
SEED = 0
NOISE = 0.02  # random weights on top of diffusers' init; larger makes the guided nets amplify float32 rounding more


# ----------------------------------------------------------------------------- the tiny release
def randomised(build, seed: int) -> torch.nn.Module:
    """``build()`` with every weight random and fixed by ``seed``: diffusers zero-initialises output
    convolutions and some embeddings, which would make the images constant and the comparison empty."""
    torch.manual_seed(seed)
    module = build()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * NOISE)
    return module.eval()


def write_tiny_karlo(folder: Path) -> dict:
    """karlo-v1-alpha's components and scheduler configs at tiny sizes, saved as diffusers saves them."""
    import diffusers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    prior = randomised(partial(diffusers.PriorTransformer, **PRIOR, embedding_dim=CLIP_DIM, num_embeddings=CONTEXT,
                               additional_embeddings=4), 0)
    with torch.no_grad():  # the image-embedding statistics give the decoder's image_norm: keep them positive
        prior.clip_std.copy_(torch.rand_like(prior.clip_std) + 0.5)
    channels = DECODER["block_out_channels"]
    decoder = randomised(partial(
        diffusers.UNet2DConditionModel, sample_size=DECODER["sample_size"], in_channels=3, out_channels=6, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=8,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=DECODER["cross_attention_dim"], attention_head_dim=16, resnet_time_scale_shift="scale_shift",
        class_embed_type="identity"), 1)
    text_proj = randomised(partial(UnCLIPTextProjModel, clip_embeddings_dim=CLIP_DIM, time_embed_dim=4 * channels[0],
                                   cross_attention_dim=DECODER["cross_attention_dim"]), 2)
    super_res = {name: randomised(partial(
        diffusers.UNet2DModel, sample_size=SUPER_RES["sample_size"], in_channels=6, out_channels=3, layers_per_block=1,
        block_out_channels=SUPER_RES["block_out_channels"], norm_num_groups=8, down_block_types=("ResnetDownsampleBlock2D",) * 2,
        up_block_types=("ResnetUpsampleBlock2D",) * 2, add_attention=False, resnet_time_scale_shift="scale_shift"), seed)
        for name, seed in (("super_res_first", 3), ("super_res_last", 4))}
    modules = {"prior": prior, "decoder": decoder, "text_proj": text_proj, **super_res}
    for name, module in modules.items():
        module.save_pretrained(folder / name)
    schedulers = {"prior_scheduler": dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                          clip_sample_range=5.0),
                  "decoder_scheduler": dict(variance_type="learned_range", prediction_type="epsilon"),
                  "super_res_scheduler": dict(variance_type="fixed_small_log", prediction_type="epsilon")}
    for name, config in schedulers.items():
        diffusers.UnCLIPScheduler(**config).save_pretrained(folder / name)
    return modules


# ------------------------------------------------------- diffusers' pipeline on unclip's CLIP
class ClipTokenizer:
    """What UnCLIPPipeline asks of its tokenizer, answered by unclip's CLIP (karlo's ViT-L-14 is not at hand)."""

    def __init__(self, clip):
        self.clip, self.model_max_length = clip, clip.context_length

    def __call__(self, prompts, **_):
        ids = self.clip.tokenize([prompts] if isinstance(prompts, str) else prompts)
        return SimpleNamespace(input_ids=ids, attention_mask=self.clip.encode_tokens(ids).mask)


class ClipTextEncoder(torch.nn.Module):
    """What UnCLIPPipeline asks of CLIPTextModelWithProjection: the raw text embedding and last hidden states."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip

    @property
    def device(self) -> torch.device:
        return self.clip.device

    def forward(self, ids):
        text = self.clip.encode_tokens(ids)
        return SimpleNamespace(text_embeds=text.pooled, last_hidden_state=text.tokens)


class UnitNormPrior(torch.nn.Module):
    """The published prior with unclip's two conventions, so both pipelines give the same images: z_t enters
    unit-norm, and the sampled z_i leaves unit-norm scaled to the decoder's image_norm (two normalisations)."""

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


def float64_tables(scheduler):
    """UnCLIPScheduler with its tables in float64, as unclip's: its float32 ``1 - betas`` moves the last
    steps' coefficients by ~1e-3 relative. Scalar lookups per step: no cost to the timing."""
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1 - scheduler.betas
    scheduler.alphas_cumprod = scheduler.alphas.cumprod(0)
    scheduler.one = scheduler.one.double()
    return scheduler


def diffusers_pipeline(folder: Path, modules: dict, clip, image_norm: float):
    import diffusers

    schedulers = {name: float64_tables(diffusers.UnCLIPScheduler.from_pretrained(folder / name))
                  for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler")}
    pipe = diffusers.UnCLIPPipeline(
        prior=UnitNormPrior(modules["prior"], image_norm), decoder=modules["decoder"], text_proj=modules["text_proj"],
        text_encoder=ClipTextEncoder(clip), tokenizer=ClipTokenizer(clip), super_res_first=modules["super_res_first"],
        super_res_last=modules["super_res_last"], **schedulers)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------- timing
def best_ms_per_image(sample, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``sample()`` (each draws one image per prompt), per image."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample()
        times.append(time.perf_counter() - start)
    return min(times) * 1000 / len(PROMPTS)


def diffusers_rows(repeats: int = 3) -> list[tuple[str, str, str]]:
    """ms/image for diffusers fp32, unclip fp32 and unclip bf16-mixed on the same tiny karlo components,
    after one untimed call each whose images are compared (fp32 against diffusers, bf16 against fp32)."""
    what = (f"sampling end to end vs diffusers UnCLIPPipeline (tiny random karlo components: prior {PRIOR['num_layers']} layers "
            f"x {PRIOR['num_attention_heads'] * PRIOR['attention_head_dim']} wide, decoder {DECODER['sample_size']} px "
            f"{DECODER['block_out_channels']}, super-res {DECODER['sample_size']} -> {SUPER_RES['sample_size']} px "
            f"{SUPER_RES['block_out_channels']}; prior/decoder/super-res steps {STEPS['prior']}/{STEPS['decoder']}/"
            f"{STEPS['super_res']}, guidance {GUIDANCE['prior']:g}/{GUIDANCE['decoder']:g}; {len(PROMPTS)} prompts x 1 image")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return [(what + ")", "not measured", "needs diffusers (pip install diffusers)")]
    from unclip.clip import FrozenCLIP
    from unclip.convert import convert
    from unclip.pipeline import UnCLIPPipeline

    clip = FrozenCLIP(TINY_CLIP["clip_model"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        modules = write_tiny_karlo(folder)
        stages = convert("karlo", folder, folder / "stages", **TINY_CLIP)
        ours = {precision: UnCLIPPipeline.from_checkpoints(prior=stages / "prior.ckpt", decoder=stages / "decoder.ckpt",
                                                           upsamplers=[stages / "upsampler.ckpt"], clip=clip, precision=precision)
                for precision in ("32-true", "bf16-mixed")}
        theirs = diffusers_pipeline(folder, modules, clip, ours["32-true"].decoder.image_norm)

    def run_theirs(output_type: str = "pil"):
        return theirs(prompt=PROMPTS, generator=torch.Generator().manual_seed(SEED), output_type=output_type,
                      prior_num_inference_steps=STEPS["prior"], decoder_num_inference_steps=STEPS["decoder"],
                      super_res_num_inference_steps=STEPS["super_res"], prior_guidance_scale=GUIDANCE["prior"],
                      decoder_guidance_scale=GUIDANCE["decoder"]).images

    def run_ours(precision: str):
        return ours[precision].generate(PROMPTS, n=1, seed=SEED, prior_steps=f"linspace{STEPS['prior']}",
                                        decoder_steps=f"linspace{STEPS['decoder']}",
                                        upsampler_steps=f"linspace{STEPS['super_res']}", prior_guidance=GUIDANCE["prior"],
                                        decoder_guidance=GUIDANCE["decoder"])

    with torch.inference_mode():  # the warm-up calls: their images show both pipelines do the same work
        reference = torch.from_numpy(run_theirs("np")).permute(0, 3, 1, 2)  # (B, 3, H, W) in [0, 1]
        images = {precision: run_ours(precision).pixels.add(1).div(2).clamp(0, 1) for precision in ours}
        fp32_gap = (images["32-true"] - reference).abs()
        bf16_gap = (images["bf16-mixed"] - images["32-true"]).abs()
        ms = {"diffusers": best_ms_per_image(run_theirs, repeats)}
        ms.update({precision: best_ms_per_image(lambda: run_ours(precision), repeats) for precision in ours})
    same = f"same images: |unclip fp32 - diffusers| max {fp32_gap.max():.1e}, mean {fp32_gap.mean():.1e} in [0, 1]"
    bf16 = f"|bf16 - fp32 image| max {bf16_gap.max():.1e}, mean {bf16_gap.mean():.1e}"
    return [(f"{what}): diffusers fp32", f"{ms['diffusers']:,.1f} ms/image", f"{same}; best of {repeats} after a warm-up"),
            (f"{what}): unclip fp32", f"{ms['32-true']:,.1f} ms/image",
             f"diffusers/unclip {ms['diffusers'] / ms['32-true']:.2f}x; {same}"),
            (f"{what}): unclip bf16-mixed", f"{ms['bf16-mixed']:,.1f} ms/image",
             f"diffusers (fp32)/unclip {ms['diffusers'] / ms['bf16-mixed']:.2f}x; {bf16}")]
