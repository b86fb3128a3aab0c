"""kakaobrain/karlo-v1-alpha (diffusers' ``UnCLIPPipeline`` layout) -> three unclip stages.

    SRC/prior/ + SRC/prior_scheduler/               -> published_prior      (unclip.convert.diffusers_prior)
    SRC/decoder/ + SRC/text_proj/ + SRC/decoder_scheduler/
                                                    -> published_decoder    (UNet2DConditionModel + UnCLIPTextProjModel)
    SRC/super_res_first/ + SRC/super_res_last/ + SRC/super_res_scheduler/
                                                    -> published_upsampler  (64 -> 256, UNet2DModel x 2)

``part=prior|decoder|upsampler|all`` picks the stages (``all``: each whose main folder, ``prior/``,
``decoder/``, ``super_res_first/``, is there; a stage with some of its folders missing is refused by name).
Each stage's sampler is the published pipeline's: ancestral steps on UnCLIPScheduler's spacing, x0 clamped as
its scheduler config says; 25 decoder steps at guidance 8, 7 super-resolution steps without guidance.

The decoder was trained on raw CLIP image embeddings, unclip hands it unit-norm ones: it scales them to
``image_norm``, the root-mean-square norm of the image embeddings the prior was trained on,
sqrt(sum(clip_mean^2 + clip_std^2)) from the prior's statistics (``image_norm=`` overrides it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unclip.convert.common import (ConversionError, clip_identity, component, load_matching, read_json, read_weights,
                                   stage_checkpoint)
from unclip.convert.diffusers_prior import CLIPS, convert_prior, read_scheduler

PARTS = ("prior", "decoder", "upsampler")
MAIN_FOLDER = {"prior": "prior", "decoder": "decoder", "upsampler": "super_res_first"}
DECODER_STEPS, DECODER_GUIDANCE = 25, 8.0  # UnCLIPPipeline's decoder_num_inference_steps, decoder_guidance_scale
SUPER_RES_STEPS = 7                        # its super_res_num_inference_steps (no guidance)


@dataclass
class ClipSizes:
    """What a stage asks of its CLIP while it is built: the sizes. Converting needs no CLIP weights (karlo's
    ViT-L-14 is not at hand); ``unclip.load`` builds the real one from the recorded identity."""
    embed_dim: int
    text_width: int
    context_length: int


def model_config(folder: Path, required: tuple[str, ...], what: str) -> dict:
    config = {k: v for k, v in read_json(folder / "config.json").items() if not k.startswith("_")}
    missing = [k for k in required if k not in config]
    if missing:
        raise ConversionError(f"{folder}/config.json has no {', '.join(missing)}; expected a diffusers {what} config")
    return config


# -------------------------------------------------------------------------------------- decoder
def prior_image_norm(src: Path) -> float:
    """sqrt(sum(mean^2 + std^2)) over the prior's ``clip_mean``/``clip_std``: the root-mean-square length of the
    raw image embeddings it was trained to produce (E|z|^2 = sum_d mean_d^2 + std_d^2)."""
    folder = component(src, "prior", what="the prior, whose image-embedding statistics give the decoder's image_norm; "
                                          "or give image_norm=")
    weights = component(folder, "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", what="the prior's weights")
    if weights.suffix == ".safetensors":  # two small tensors: read them alone
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as f:
            names = set(f.keys())
            stats = {k: f.get_tensor(k) for k in ("clip_mean", "clip_std") if k in names}
    else:
        stats = {k: v for k, v in read_weights(weights).items() if k in ("clip_mean", "clip_std")}
    if len(stats) < 2 or not bool((stats["clip_std"] > 0).all()):
        raise ConversionError(f"the prior in {folder} carries no image-embedding statistics (clip_mean/clip_std); give "
                              f"image_norm= (the typical length of the raw CLIP image embeddings the decoder reads)")
    return float((stats["clip_mean"].double() ** 2 + stats["clip_std"].double() ** 2).sum().sqrt())


def convert_decoder(src: Path, options: dict) -> dict:
    from unclip.modules.published_decoder import PublishedDecoderModule

    decoder_folder = component(src, "decoder", what="karlo's decoder, a diffusers UNet2DConditionModel")
    proj_folder = component(src, "text_proj", what="the decoder's UnCLIPTextProjModel")
    unet = model_config(decoder_folder, ("in_channels", "out_channels", "sample_size", "cross_attention_dim"),
                        "UNet2DConditionModel")
    proj = model_config(proj_folder, ("clip_embeddings_dim", "time_embed_dim", "cross_attention_dim"), "UnCLIPTextProjModel")
    diffusion, sampler = read_scheduler(src, ("decoder_scheduler",), "the decoder's", DECODER_STEPS, DECODER_GUIDANCE)
    identity = clip_identity(options, *CLIPS["karlo"])
    dim = proj["clip_embeddings_dim"]
    if identity["dim"] != dim or identity["text_width"] != dim:
        raise ConversionError(f"the decoder's text_proj in {proj_folder} reads embeddings and token states of width {dim}, "
                              f"but CLIP {identity['model']} gives embed_dim {identity['dim']} and token width "
                              f"{identity['text_width']}; name the CLIP it was trained with (clip_model=)")
    image_norm = float(options["image_norm"]) if "image_norm" in options else prior_image_norm(src)
    clip = ClipSizes(identity["dim"], identity["text_width"], identity["context_length"])
    try:
        module = PublishedDecoderModule({"unet": unet, "text_proj": proj}, diffusion, sampler, clip=clip,
                                        image_norm=image_norm, source="karlo")
    except ValueError as error:  # the configs disagree with each other or with the scheduler
        raise ConversionError(f"karlo's decoder in {src}: {error}") from error
    load_matching(module.net.unet, read_weights(decoder_folder), f"{decoder_folder}")
    load_matching(module.net.text_proj, read_weights(proj_folder), f"{proj_folder}")
    return stage_checkpoint(module, identity, {})


# ------------------------------------------------------------------------------------ upsampler
def convert_upsampler(src: Path, options: dict) -> dict:
    from unclip.modules.published_upsampler import PublishedUpsamplerModule

    folders = {name: component(src, f"super_res_{name}", what=f"karlo's super-resolution UNet2DModel used for "
                                                              f"{'every step but the last' if name == 'first' else 'the last step'}")
               for name in ("first", "last")}
    configs = {name: model_config(folder, ("in_channels", "out_channels", "sample_size"), "UNet2DModel")
               for name, folder in folders.items()}
    diffusion, sampler = read_scheduler(src, ("super_res_scheduler",), "the super-resolution", SUPER_RES_STEPS, 1.0)
    identity = clip_identity(options, *CLIPS["karlo"])
    image_size = int(configs["first"]["sample_size"])
    decoder_config = src / "decoder" / "config.json"
    lowres_size = int(options.get("lowres_size") or (read_json(decoder_config)["sample_size"] if decoder_config.exists()
                                                     else image_size // 4))
    try:
        module = PublishedUpsamplerModule({**configs, "image_size": image_size}, diffusion, sampler, lowres_size=lowres_size,
                                          source="karlo")
    except ValueError as error:
        raise ConversionError(f"karlo's super-resolution stage in {src}: {error}") from error
    for name, folder in folders.items():
        load_matching(getattr(module.net, name), read_weights(folder), f"{folder}")
    return stage_checkpoint(module, identity, {})


# ------------------------------------------------------------------------------------------ kind
CONVERTERS = {"prior": lambda src, options: convert_prior(src, options, "karlo"), "decoder": convert_decoder,
              "upsampler": convert_upsampler}


def convert_karlo(src: Path, options: dict, part: str = "prior") -> dict[str, dict]:
    """The stage checkpoints of ``part`` (one of :data:`PARTS` or ``all``), by part name."""
    if part not in (*PARTS, "all"):
        raise ConversionError(f"part={part} is not one of {', '.join(PARTS)}, all")
    wanted = [p for p in PARTS if (src / MAIN_FOLDER[p]).exists()] if part == "all" else [part]
    if not wanted:
        raise ConversionError(f"{src} has none of {', '.join(f + '/' for f in MAIN_FOLDER.values())}; expected karlo's "
                              f"published layout (see README, 'Published weights')")
    return {name: CONVERTERS[name](src, options) for name in wanted}


convert_karlo.parts = PARTS  # several stages: unclip.convert writes them to out=FOLDER, or one to out=FILE.ckpt
KINDS = {"karlo": convert_karlo}
