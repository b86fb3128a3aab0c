"""Published priors in the diffusers layout -> ``published_prior`` stages.

    SRC/prior/config.json + diffusion_pytorch_model.safetensors (or .bin)   diffusers PriorTransformer
    SRC/prior_scheduler/scheduler_config.json  (karlo; Kandinsky's repo names it scheduler/)

``karlo`` (kakaobrain/karlo-v1-alpha, ``UnCLIPPipeline``) and ``kandinsky22_prior``
(kandinsky-community/kandinsky-2-2-prior, ``KandinskyV22PriorPipeline``) share the format; they differ in
the CLIP they were trained with. The scheduler config gives the diffusion process (its betas and what the
net predicts) and the default sampler (the published one: ancestral steps on UnCLIPScheduler's spacing,
x0 clamped to ``clip_sample_range``, guidance 4). The prior's ``clip_mean``/``clip_std`` (the
standardisation it denoises in; all zero when the weights carry none, i.e. raw embeddings) become the
stage's z_i normalisation; z_t enters unnormalised, as the published pipelines pass it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from unclip.convert.common import (ConversionError, clip_identity, component, load_matching, read_json, read_weights,
                                   stage_checkpoint)

SCHEDULES = {"squaredcos_cap_v2": "cosine", "linear": "linear", "scaled_linear": "scaled_linear"}
PREDICTIONS = {"sample": "x0", "epsilon": "eps", "v_prediction": "v"}
VARIANCES = {"fixed_small_log": "fixed_small", "fixed_small": "fixed_small", "fixed_large": "fixed_large",
             "fixed_large_log": "fixed_large", "learned_range": "learned_range"}
CLIPS = {"karlo": ("ViT-L-14", "openai"), "kandinsky22_prior": ("ViT-bigG-14", "laion2b_s39b_b160k")}
PUBLISHED_STEPS = 25       # both pipelines' prior_num_inference_steps / num_inference_steps
PUBLISHED_GUIDANCE = 4.0   # both pipelines' prior_guidance_scale / guidance_scale


def read_scheduler(src: Path, folders: tuple[str, ...] = ("prior_scheduler", "scheduler"), what: str = "the prior's",
                   steps: int = PUBLISHED_STEPS, guidance: float = PUBLISHED_GUIDANCE) -> tuple[dict, dict]:
    """(diffusion config, sampler config) from the published scheduler config (the first of ``folders``); the
    sampler takes the published pipeline's ``steps`` and ``guidance``."""
    folder = component(src, *folders, what=f"{what} scheduler config")
    config = read_json(folder / "scheduler_config.json")
    name = config.get("_class_name", "a scheduler")

    def pick(table: dict, key: str, default: str) -> str:
        value = config.get(key, default)
        if value not in table:
            raise ConversionError(f"{folder}/scheduler_config.json ({name}) has {key}={value!r}; unclip converts "
                                  f"{', '.join(table)}")
        return table[value]

    diffusion = {"schedule": pick(SCHEDULES, "beta_schedule", "squaredcos_cap_v2"),
                 "num_timesteps": int(config.get("num_train_timesteps", 1000)),
                 "beta_start": float(config.get("beta_start", 1e-4)), "beta_end": float(config.get("beta_end", 0.02)),
                 "prediction": pick(PREDICTIONS, "prediction_type", "epsilon"),
                 "variance": pick(VARIANCES, "variance_type", "fixed_small_log")}
    sampler = {"kind": "ddpm", "steps": f"linspace{steps}", "eta": 0.0, "guidance_scale": float(guidance),
               "clip_denoised": bool(config.get("clip_sample", True)),
               "clip_range": float(config.get("clip_sample_range", 1.0)), "dynamic_threshold": None, "progress": False}
    return diffusion, sampler


def prior_config(folder: Path) -> dict:
    config = {k: v for k, v in read_json(folder / "config.json").items() if not k.startswith("_")}
    for key in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim", "num_embeddings"):
        if key not in config:
            raise ConversionError(f"{folder}/config.json has no {key}; expected a diffusers PriorTransformer config")
    return config


def check_clip_fits(prior: dict, identity: dict, folder: Path) -> None:
    """The CLIP's sizes against the prior's: z_i, z_t and token width all equal embedding_dim, and at most
    num_embeddings caption tokens."""
    dim, width, context = identity["dim"], identity["text_width"], identity["context_length"]
    if dim != prior["embedding_dim"] or width != prior["embedding_dim"] or context > prior["num_embeddings"]:
        raise ConversionError(f"the prior in {folder} reads embeddings of size {prior['embedding_dim']} and "
                              f"{prior['num_embeddings']} caption tokens of width {prior['embedding_dim']}, but CLIP "
                              f"{identity['model']} gives embed_dim {dim}, {context} tokens of width {width}; name the "
                              f"CLIP it was trained with (clip_model=)")


def normalisation(net, embed_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of z_i from the prior's ``clip_mean``/``clip_std``; zero std means none (raw embeddings)."""
    mean, std = net.prior.clip_mean.detach().view(-1).float(), net.prior.clip_std.detach().view(-1).float()
    if len(mean) != embed_dim:
        raise ConversionError(f"clip_mean has {len(mean)} entries, the prior's embeddings {embed_dim}")
    if not bool((std != 0).any()):
        return torch.zeros(embed_dim), torch.ones(embed_dim)
    if not bool((std > 0).all()):
        raise ConversionError("the prior's clip_std has zero or negative entries next to positive ones; the weights are damaged")
    return mean, std


def eval_block(sampler: dict) -> dict:
    published = {"steps": sampler["steps"], "guidance_scale": sampler["guidance_scale"]}
    return {"settings": [published, {**published, "guidance_scale": 1.0}],
            "sweep": {"guidance_scale": [1, 2, 4, 8], "steps": [10, 25]},
            "image_setting": published}


def convert_prior(src: Path, options: dict, source: str) -> dict:
    from unclip.modules.published_prior import PublishedPriorModule

    folder = component(src, "prior", what="the diffusers PriorTransformer")
    prior = prior_config(folder)
    state = read_weights(folder)
    diffusion, sampler = read_scheduler(src)
    identity = clip_identity(options, *CLIPS[source])
    check_clip_fits(prior, identity, folder)
    net = {"prior": prior, "embed_dim": prior["embedding_dim"], "text_width": identity["text_width"],
           "max_text_tokens": identity["context_length"]}
    module = PublishedPriorModule(net, diffusion, sampler, best_of=1, source=source)
    load_matching(module.net.prior, state, f"{folder}")
    mean, std = normalisation(module.net, prior["embedding_dim"])
    with torch.no_grad():
        module.img_mean.copy_(mean)
        module.img_std.copy_(std)
    return stage_checkpoint(module, identity, eval_block(sampler))


KINDS = {"karlo": lambda src, options: convert_prior(src, options, "karlo"),
         "kandinsky22_prior": lambda src, options: convert_prior(src, options, "kandinsky22_prior")}
