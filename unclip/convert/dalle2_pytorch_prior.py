"""DALLE2-pytorch ``DiffusionPrior`` weights + their JSON config (LAION's released priors, e.g.
laion/DALLE2-PyTorch ``prior/best.pth`` + ``prior/prior_config.json``) -> ``dalle2_pytorch_prior`` stages.

    SRC/[prior/]prior_config.json (or config.json)   TrainDiffusionPriorConfig ({"prior": {...}, ...}) or
                                                     its "prior" block alone (DiffusionPriorConfig)
    SRC/[prior/]best.pth (or latest.pth, or weights=NAME)
        a DiffusionPrior state dict, or a DiffusionPriorTrainer save whose "ema_model" (else "model") it is

The config gives the net (``prior.net``), the diffusion process (``beta_schedule``, ``timesteps``,
``predict_x_start``/``predict_v``), the z_i scale (``image_embed_scale``, default sqrt(image_embed_dim)),
what guidance may use (``cond_drop_prob``) and the published sampler: DALLE2-pytorch's ``p_sample_loop``
runs ancestral steps over every timestep, or DDIM with eta 1 over ``sample_timesteps`` when fewer; x0 is
clamped to [-1, 1] only when the net predicts noise. Its CLIP (``prior.clip``: make openai / open_clip)
becomes the stage's CLIP identity; LAION's is OpenAI's ViT-L/14. The weights' own ``noise_scheduler.betas``
must be the config's; the CLIP adapter's weights inside the state dict (``clip.*``) are not the stage's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from unclip.convert.common import (ConversionError, clip_identity, component, load_matching, read_json, read_weights,
                                   stage_checkpoint)

CONFIG_FILES = ("prior_config.json", "config.json")
WEIGHT_FILES = ("best.pth", "latest.pth", "prior.pth", "model.safetensors", "pytorch_model.bin")
DEFAULT_CLIP = ("ViT-L-14", "openai")  # LAION's priors: OpenAIClipAdapter("ViT-L/14")
NET_KEYS = ("dim", "depth", "dim_head", "heads", "ff_mult", "num_timesteps", "num_time_embeds", "num_image_embeds",
            "num_text_embeds", "max_text_len", "norm_in", "norm_out", "final_proj", "normformer", "rotary_emb",
            "attn_dropout", "ff_dropout")
NET_DEFAULTS = {"max_text_len": 256}  # DiffusionPriorNetwork's own default
# options unclip's samplers do not have: refused by name rather than run differently
UNSUPPORTED = {("net", "self_cond"): "self-conditioning (the sampler would feed back the previous x0)",
               ("prior", "sampling_clamp_l2norm"): "the x0 renormalisation at every sampling step"}


# -------------------------------------------------------------------------------------------- reading
def prior_folder(src: Path) -> Path:
    return src / "prior" if (src / "prior").is_dir() and not any((src / n).exists() for n in CONFIG_FILES) else src


def read_config(folder: Path) -> dict:
    """The ``prior`` block of the training config (or the file itself when it is that block)."""
    path = component(folder, *CONFIG_FILES, what="the DALLE2-pytorch prior config")
    config = read_json(path)
    prior = config.get("prior", config)
    if not isinstance(prior.get("net"), dict) or "dim" not in prior["net"] or "depth" not in prior["net"]:
        raise ConversionError(f"{path} has no prior.net with dim and depth; expected DALLE2-pytorch's "
                              f"TrainDiffusionPriorConfig JSON (prior: {{net: {{dim, depth, ...}}, image_embed_dim, ...}})")
    if "image_embed_dim" not in prior:
        raise ConversionError(f"{path} has no prior.image_embed_dim; expected DALLE2-pytorch's DiffusionPriorConfig")
    for (block, key), what in UNSUPPORTED.items():
        if (prior["net"] if block == "net" else prior).get(key):
            raise ConversionError(f"{path} sets {block}.{key}: {what} is not converted yet")
    return {**prior, "source_file": str(path)}


def weights_file(folder: Path, options: dict) -> Path:
    if options.get("weights"):
        path = folder / options["weights"]
        if not path.exists():
            raise ConversionError(f"{folder} has no {options['weights']} (weights=); expected the DiffusionPrior weights")
        return path
    return component(folder, *WEIGHT_FILES, what="the DiffusionPrior weights; or name them with weights=")


def prior_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(net weights under DALLE2-pytorch's DiffusionPriorNetwork names, noise scheduler buffers) from a
    DiffusionPrior state dict or a trainer save (its EMA copy first, as DALLE2-pytorch saves it for reload)."""
    state = read_weights(path)
    for key in ("ema_model", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    tensors = {k.removeprefix("module.").removeprefix("ema_model."): v for k, v in state.items()
               if isinstance(v, torch.Tensor)}
    if not any(k.startswith("net.") for k in tensors) and "learned_query" not in tensors:
        raise ConversionError(f"{path} holds no DiffusionPrior weights (no net.* tensors; keys "
                              f"{', '.join(list(state)[:6])}); expected a DALLE2-pytorch DiffusionPrior state dict or "
                              f"a DiffusionPriorTrainer save")
    net, schedule = {}, {}
    for name, tensor in tensors.items():
        if name.startswith("clip."):  # the CLIP adapter's frozen weights: the stage names its CLIP instead
            continue
        if name.startswith("noise_scheduler."):
            schedule[name.removeprefix("noise_scheduler.")] = tensor
        else:
            net[name.removeprefix("net.")] = tensor
    return net, schedule


# ---------------------------------------------------------------------------------------- configs
def diffusion_config(prior: dict, schedule_state: dict) -> dict:
    """unclip's diffusion config for DALLE2-pytorch's NoiseScheduler, checked against the weights' betas."""
    from unclip.diffusion import make_betas

    steps = int(prior.get("timesteps", 1000))
    name = prior.get("beta_schedule", "cosine")
    scale = 1000 / steps  # DALLE2-pytorch's linear and quadratic schedules stretch DDPM's betas to T steps
    if name == "cosine":
        schedule = {"schedule": "cosine"}
    elif name in ("linear", "quadratic"):
        schedule = {"schedule": "linear" if name == "linear" else "scaled_linear",
                    "beta_start": scale * 1e-4, "beta_end": scale * 0.02}
    else:
        raise ConversionError(f"{prior['source_file']} has beta_schedule={name!r}; unclip converts cosine, linear, quadratic")
    prediction = "v" if prior.get("predict_v") else "x0" if prior.get("predict_x_start", True) else "eps"
    diffusion = {**schedule, "num_timesteps": steps, "prediction": prediction, "variance": "fixed_small"}
    if "betas" in schedule_state:
        theirs = schedule_state["betas"].double()
        ours = make_betas(diffusion["schedule"], steps, diffusion.get("beta_start", 1e-4), diffusion.get("beta_end", 0.02))
        if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=1e-5, atol=1e-7):
            raise ConversionError(f"the weights' noise_scheduler.betas ({len(theirs)} steps) are not those of "
                                  f"{prior['source_file']} (beta_schedule={name}, timesteps={steps}); the config "
                                  f"beside the weights must be the one they were trained with")
    return diffusion


def sampler_config(prior: dict, diffusion: dict) -> dict:
    """DALLE2-pytorch's p_sample_loop: ancestral over every step, or DDIM (eta 1) over sample_timesteps."""
    steps, total = prior.get("sample_timesteps"), diffusion["num_timesteps"]
    ddim = steps is not None and int(steps) < total
    return {"kind": "ddim" if ddim else "ddpm", "steps": int(steps) if ddim else total, "eta": 1.0 if ddim else 0.0,
            "guidance_scale": 1.0, "clip_denoised": not prior.get("predict_x_start", True), "clip_range": 1.0,
            "dynamic_threshold": None, "progress": False}


def published_clip(prior: dict) -> tuple[str | None, str | None]:
    """(open_clip model, pretrained tag) of the config's CLIP adapter; (None, None) for one open_clip lacks."""
    clip = prior.get("clip")
    if not clip:
        return DEFAULT_CLIP
    make, model = clip.get("make", "openai"), clip.get("model", "ViT-L/14")
    if make == "openai":
        return model.replace("/", "-"), "openai"
    if make == "open_clip":  # DALLE2-pytorch's AdapterConfig takes open_clip's last pretrained tag for the model
        import open_clip

        return model, dict(open_clip.list_pretrained()).get(model)
    return None, None


def net_config(prior: dict, identity: dict) -> dict:
    net = {k: prior["net"].get(k, NET_DEFAULTS.get(k)) for k in NET_KEYS if k in prior["net"] or k in NET_DEFAULTS}
    dim = int(net["dim"])
    if int(prior["image_embed_dim"]) != dim:
        raise ConversionError(f"{prior['source_file']}: prior.net.dim {dim} differs from image_embed_dim "
                              f"{prior['image_embed_dim']} (DALLE2-pytorch requires them equal)")
    tokens = bool(prior.get("condition_on_text_encodings", True))
    if identity["dim"] != dim or (tokens and identity["text_width"] != dim):
        raise ConversionError(f"the prior in {prior['source_file']} reads embeddings of size {dim}"
                              f"{f' and text encodings of width {dim}' if tokens else ''}, but CLIP {identity['model']} "
                              f"gives embed_dim {identity['dim']}, tokens of width {identity['text_width']}; name the "
                              f"CLIP it was trained with (clip_model=)")
    return {**net, "embed_dim": dim, "text_width": identity["text_width"] if tokens else 0,
            "max_text_tokens": identity["context_length"]}


def eval_block(sampler: dict, can_guide: bool) -> dict:
    published = {"steps": sampler["steps"], "guidance_scale": 1.0}
    guided = [{**published, "guidance_scale": 2.0}] if can_guide else []
    return {"settings": [published, *guided],
            "sweep": {"guidance_scale": [1, 2, 4] if can_guide else [1], "steps": [25, 64]},
            "image_setting": published}


# ---------------------------------------------------------------------------------------- convert
def convert_prior(src: Path, options: dict) -> dict:
    from unclip.modules.dalle2_prior import Dalle2PriorModule
    from unclip.nets.dalle2_prior import from_dalle2_names

    folder = prior_folder(src)
    prior = read_config(folder)
    path = weights_file(folder, options)
    net_state, schedule_state = prior_state(path)
    diffusion = diffusion_config(prior, schedule_state)
    sampler = sampler_config(prior, diffusion)
    model, pretrained = published_clip(prior)
    if model is None and "clip_model" not in options:
        raise ConversionError(f"{prior['source_file']} names a {prior['clip'].get('make')} CLIP adapter, which open_clip "
                              f"cannot build; name an open_clip equivalent with clip_model= and clip_pretrained=")
    identity = clip_identity(options, model, pretrained)
    net = net_config(prior, identity)
    drop = min(float(prior.get(k) if prior.get(k) is not None else prior.get("cond_drop_prob", 0.0))
               for k in ("text_cond_drop_prob", "image_cond_drop_prob"))
    module = Dalle2PriorModule(net, diffusion, sampler, cond_drop_prob=drop, best_of=2,
                               use_token_states=bool(prior.get("condition_on_text_encodings", True)))
    load_matching(module.net, from_dalle2_names(net_state), f"{path}")
    scale = float(prior.get("image_embed_scale") or math.sqrt(net["dim"]))
    with torch.no_grad():
        module.img_mean.zero_()
        module.img_std.fill_(1.0 / scale)  # DALLE2-pytorch denoises z_i * image_embed_scale
    return stage_checkpoint(module, identity, eval_block(sampler, can_guide=drop > 0))


KINDS = {"dalle2_pytorch_prior": convert_prior}
