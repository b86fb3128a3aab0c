"""``python -m unclip.convert``: tiny random published priors in diffusers' layout (karlo's and Kandinsky
2.2's) become ``published_prior`` stages whose net, one guided sampling step and a whole sampling loop equal
diffusers' own (``PriorTransformer``, ``UnCLIPScheduler``, the ``UnCLIPPipeline`` prior loop); the CLIP a
converted stage expects is checked by model and pretrained tag; bad folders get named errors and no file."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from unclip.convert import ConversionError, convert
from unclip.diffusion import classifier_free_guidance, ddpm_step
from unclip.loading import check_clip, load
from test_leaderboard import stages  # noqa: F401  (a fixture: tiny stages of every prior kind and a decoder)

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {"clip_model": "unclip-tiny", "clip_pretrained": "none"}  # the tests' random tiny CLIP (embed 128, 32 tokens)
CAPTIONS = ["a red circle", "two blue squares on the left", "a big green triangle"]


def tiny_published_prior(seed: int = 0, **config):
    """A diffusers PriorTransformer at the tiny CLIP's sizes, every weight random (diffusers zero-initialises
    the positional and query embeddings and the stats), clip_std positive."""
    torch.manual_seed(seed)
    prior = diffusers.PriorTransformer(**{**dict(num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                                 embedding_dim=128, num_embeddings=32, additional_embeddings=4), **config})
    with torch.no_grad():
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        prior.clip_std.copy_(torch.rand_like(prior.clip_std) + 0.5)
    return prior.eval()


def write_published(folder: Path, prior, scheduler_folder: str = "prior_scheduler", **scheduler) -> Path:
    prior.save_pretrained(folder / "prior")
    diffusers.UnCLIPScheduler(**{**dict(variance_type="fixed_small_log", prediction_type="sample", clip_sample=True,
                                        clip_sample_range=5.0), **scheduler}).save_pretrained(folder / scheduler_folder)
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = tmp_path_factory.mktemp("karlo")
    prior = tiny_published_prior()
    write_published(folder, prior)
    stage = convert("karlo", folder, folder / "karlo.ckpt", **TINY_CLIP)
    return {"folder": folder, "prior": prior, "stage": stage}


def published_condition(clip, captions):
    """What the published pipelines hand the prior: text embeds, token states padded to the context and
    the tokenizer's mask; and the same for the empty prompt (their unconditional branch)."""
    text, empty = clip.encode_text(captions), clip.encode_text([""] * len(captions))
    return (text.z_txt, text.tokens, text.mask), (empty.z_txt, empty.tokens, empty.mask)


def test_the_converted_net_equals_the_published_prior(published, tiny_clip):
    module = load(published["stage"], clip=tiny_clip)
    assert module.kind == "published_prior" and module.hparams["clip"]["sha256"] is None
    cond = module.condition({"txt_emb": tiny_clip.encode_text(CAPTIONS).z_txt, "caption": CAPTIONS})
    (z_txt, tokens, mask), _ = published_condition(tiny_clip, CAPTIONS)
    assert cond["tokens"].shape[1] < tokens.shape[1]  # unclip trims the padding; the net pads it back
    x_t, t = torch.randn(3, 128), torch.tensor([999, 500, 3])
    ours = module.net(x_t, t, cond["z_txt"], cond["tokens"], cond["mask"])
    with torch.no_grad():
        theirs = published["prior"](x_t, t, proj_embedding=z_txt, encoder_hidden_states=tokens, attention_mask=mask).predicted_image_embedding
    print(f"max |net - PriorTransformer|: {(ours - theirs).abs().max():.2e}")
    assert (ours - theirs).abs().max() <= 1e-5
    # the stats are the published ones: post_process_latents is our denormalise
    assert torch.allclose(module.denormalise_img(x_t), published["prior"].post_process_latents(x_t), atol=1e-6)


def test_the_diffusion_process_is_the_published_schedulers(published):
    stage = torch.load(published["stage"], weights_only=True)
    from unclip.diffusion import GaussianDiffusion, space_timesteps

    diffusion = GaussianDiffusion.from_config(**stage["hyper_parameters"]["diffusion"])
    scheduler = diffusers.UnCLIPScheduler.from_pretrained(published["folder"] / "prior_scheduler")
    assert (diffusion.alphas_cumprod - scheduler.alphas_cumprod.double()).abs().max() < 1e-6
    scheduler.set_timesteps(25)
    assert space_timesteps(1000, "linspace25") == sorted(scheduler.timesteps.tolist())
    assert stage["hyper_parameters"]["sampler"]["clip_range"] == 5.0


def reference_scheduler(folder: Path, steps: int, exact: bool = True):
    """diffusers' UnCLIPScheduler from the published config. ``exact``: its tables recomputed in float64 from
    its betas; in float32 its ``alphas = 1 - betas`` rounds beta_0 ~ 4e-5 to ~1e-3 relative, which moves its
    last step's x0 coefficient off 1 by as much (our schedule is float64 throughout)."""
    scheduler = diffusers.UnCLIPScheduler.from_pretrained(folder / "prior_scheduler")
    scheduler.set_timesteps(steps)
    if exact:
        scheduler.betas = scheduler.betas.double()
        scheduler.alphas = 1 - scheduler.betas
        scheduler.alphas_cumprod = scheduler.alphas.cumprod(0)
        scheduler.one = scheduler.one.double()
    return scheduler


def diffusers_prior_step(prior, scheduler, latents, t, prev, cond, uncond, scale, generator):
    """One step of UnCLIPPipeline's prior loop (pipeline_unclip.py): the batch [uncond, cond], guidance
    uncond + scale (text - uncond), then UnCLIPScheduler.step with the next timestep."""
    (z, tok, m), (zu, toku, mu) = cond, uncond
    with torch.no_grad():
        out = prior(torch.cat([latents] * 2), timestep=t, proj_embedding=torch.cat([zu, z]),
                    encoder_hidden_states=torch.cat([toku, tok]), attention_mask=torch.cat([mu, m])).predicted_image_embedding
    out_uncond, out_text = out.chunk(2)
    out = out_uncond + scale * (out_text - out_uncond)
    return scheduler.step(out, timestep=t, sample=latents, generator=generator, prev_timestep=prev).prev_sample


def test_one_guided_sampling_step_equals_the_unclip_pipelines(published, tiny_clip):
    module = load(published["stage"], clip=tiny_clip)
    module.set_null()
    cond = module.condition({"txt_emb": tiny_clip.encode_text(CAPTIONS).z_txt, "caption": CAPTIONS})
    scheduler, float32 = (reference_scheduler(published["folder"], 25, exact) for exact in (True, False))
    process = module.sampler.process(module.diffusion, "linspace25")
    x = torch.randn(3, 128) * 3
    pair = module.net.cat_prefix(module.net.encode_prefix(cond["z_txt"], cond["tokens"], cond["mask"]),
                                 module.net.encode_prefix(cond["z_txt"], cond["tokens"], cond["mask"],
                                                          torch.ones(3, dtype=torch.bool)))
    model_fn = classifier_free_guidance(lambda x2, t2: module.net.denoise(pair, x2, t2), 4.0)
    worst, worst32 = 0.0, 0.0
    for i in (24, 12, 1, 0):  # the first step (t=999), a middle one, the last with noise, the last (no noise)
        t = int(process.timestep_map[i])
        prev = int(process.timestep_map[i - 1]) if i else None
        noise_seed = 100 + i
        index = torch.full((3,), i)
        ours, _ = ddpm_step(process, model_fn(x, torch.full((3,), t)), x, index,
                            torch.randn(3, 128, generator=torch.Generator().manual_seed(noise_seed)), module.sampler.denoise_fn())
        for reference in (scheduler, float32):
            theirs = diffusers_prior_step(published["prior"], reference, x, t, prev, *published_condition(tiny_clip, CAPTIONS),
                                          4.0, torch.Generator().manual_seed(noise_seed))
            if reference is scheduler:
                worst = max(worst, float((ours - theirs).abs().max()))
            else:
                worst32 = max(worst32, float((ours - theirs).abs().max()))
    print(f"max |ours - diffusers| over 4 guided steps: {worst:.2e} (float64 tables), {worst32:.2e} (its float32 tables)")
    assert worst <= 1e-5 and worst32 <= 1e-2, (worst, worst32)


def test_a_whole_prior_sample_equals_the_unclip_pipelines_loop(published, tiny_clip):
    """The module's sampler (ancestral, linspace spacing, clamp 5, guidance 4) against the pipeline's loop
    from the same generator: x_T first, then one noise draw per step."""
    module = load(published["stage"], clip=tiny_clip)
    cond = module.condition({"txt_emb": tiny_clip.encode_text(CAPTIONS).z_txt, "caption": CAPTIONS})
    ours = module.sample(cond, torch.Generator().manual_seed(7), steps="linspace6")
    scheduler = reference_scheduler(published["folder"], 6)
    generator = torch.Generator().manual_seed(7)
    latents = torch.randn(3, 128, generator=generator)
    steps = scheduler.timesteps.tolist()
    for i, t in enumerate(steps):
        prev = steps[i + 1] if i + 1 < len(steps) else None
        latents = diffusers_prior_step(published["prior"], scheduler, latents, t, prev,
                                       *published_condition(tiny_clip, CAPTIONS), 4.0, generator)
    theirs = F.normalize(published["prior"].post_process_latents(latents), dim=-1)
    print(f"max |ours - diffusers| after a 6-step guided sample: {(ours - theirs).abs().max():.2e}")
    assert (ours - theirs).abs().max() <= 1e-5


def test_kandinsky_layout_converts_with_its_scheduler_folder_and_clip(tmp_path, tiny_clip):
    write_published(tmp_path, tiny_published_prior(1), scheduler_folder="scheduler", clip_sample_range=10.0)
    stage = torch.load(convert("kandinsky22_prior", tmp_path, tmp_path / "k.ckpt", **TINY_CLIP), weights_only=True)
    assert stage["hyper_parameters"]["source"] == "kandinsky22_prior"
    assert stage["hyper_parameters"]["sampler"]["clip_range"] == 10.0
    # without overrides the stage names the CLIP Kandinsky 2.2 was trained with (no weights at hand: no sha256);
    # the tiny prior's sizes do not fit it, which is refused by name
    with pytest.raises(ConversionError, match="CLIP ViT-bigG-14 gives embed_dim 1280"):
        convert("kandinsky22_prior", tmp_path, tmp_path / "k2.ckpt")
    assert not (tmp_path / "k2.ckpt").exists()


# ----------------------------------------------------------------------------------- CLIP identity
def test_a_stage_without_sha256_names_its_clip_by_model_and_pretrained_tag(tiny_clip):
    check_clip(tiny_clip, {"model": "unclip-tiny", "pretrained": None, "sha256": None})
    with pytest.raises(ValueError, match=r"expects CLIP unclip-tiny-32 with pretrained=None, not unclip-tiny with pretrained=None"):
        check_clip(tiny_clip, {"model": "unclip-tiny-32", "pretrained": None, "sha256": None})
    with pytest.raises(ValueError, match=r"expects CLIP unclip-tiny with pretrained='openai', not unclip-tiny with pretrained=None"):
        check_clip(tiny_clip, {"model": "unclip-tiny", "pretrained": "openai"})


def test_loading_a_converted_stage_builds_its_clip_and_refuses_another(published, tiny_clip):
    from unclip.clip import FrozenCLIP

    module = load(published["stage"])  # builds unclip-tiny from its seed: the same weights as tiny_clip
    assert module.clip.identity()["sha256"] == tiny_clip.identity()["sha256"]
    with pytest.raises(ValueError, match="expects CLIP unclip-tiny with pretrained=None, not unclip-tiny-32"):
        load(published["stage"], clip=FrozenCLIP("unclip-tiny-32"))


# ------------------------------------------------------------------------------------------ bad input
def test_bad_folders_get_named_errors_and_write_nothing(tmp_path, published):
    out = tmp_path / "out.ckpt"
    with pytest.raises(ConversionError, match="unknown kind 'karlo2'; known kinds: .*kandinsky22_prior, karlo"):
        convert("karlo2", published["folder"], out)
    with pytest.raises(ConversionError, match="has no prior/ \\(the diffusers PriorTransformer\\)"):
        convert("karlo", tmp_path, out, **TINY_CLIP)
    no_scheduler = tmp_path / "no_scheduler"
    published["prior"].save_pretrained(no_scheduler / "prior")
    with pytest.raises(ConversionError, match="has no prior_scheduler/ or scheduler/"):
        convert("karlo", no_scheduler, out, **TINY_CLIP)
    # a config that does not describe its weights: the mismatched tensors are named
    mismatched = write_published(tmp_path / "mismatched", published["prior"])
    config = json.loads((mismatched / "prior" / "config.json").read_text())
    (mismatched / "prior" / "config.json").write_text(json.dumps({**config, "num_layers": 3, "attention_head_dim": 16}))
    with pytest.raises(ConversionError, match=r"do not match its config: missing transformer_blocks.2.*shapes \(weights vs config\) "):
        convert("karlo", mismatched, out, **TINY_CLIP)
    (mismatched / "prior" / "diffusion_pytorch_model.safetensors").write_bytes(b"not weights")
    with pytest.raises(ConversionError, match="does not read as weights"):
        convert("karlo", mismatched, out, **TINY_CLIP)
    assert not out.exists() and not list(tmp_path.glob(".out.ckpt*"))


def test_the_command_line_converts_and_names_what_is_missing(published, tmp_path):
    out = tmp_path / "cli.ckpt"
    run = subprocess.run([sys.executable, "-m", "unclip.convert", "kind=karlo", f"src={published['folder']}", f"out={out}",
                          "clip_model=unclip-tiny", "clip_pretrained=none"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.exists() and "wrote" in run.stdout
    run = subprocess.run([sys.executable, "-m", "unclip.convert", "kind=karlo", f"src={tmp_path / 'nowhere'}", f"out={out}.2"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and "is not a folder" in run.stderr and not Path(f"{out}.2").exists()


# ------------------------------------------------------------------------------- fine-tuning, ranking
def train_cli(*args):
    env = {**__import__("os").environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=600,
                          env=env, cwd=ROOT)


@pytest.mark.slow
def test_a_converted_prior_fine_tunes_resumes_and_joins_compare(published, shapes_dir, cache_dir, stages, tmp_path):  # noqa: F811
    from test_leaderboard import compose_evaluate, tiny_overrides
    from test_train_cli import common
    from unclip.eval.run import run

    args = [*common(shapes_dir, tmp_path), "model=published_prior", f"init_from={published['stage']}", "clip=unclip_tiny",
            f"data.cache_dir={cache_dir}", "trainer.limit_val_batches=1", "model.module.val_pool=8", "run.name=karlo"]
    first = train_cli(*args, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "runs" / "shapes" / "published_prior" / "karlo"
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    second = train_cli(*args, "trainer.max_steps=4")  # resumes the run dir (init_from is not applied over it)
    assert second.returncode == 0, second.stderr[-3000:]
    log = (folder / "train.log").read_text()
    assert log.count("initialised published_prior from") == 1 and log.count("resuming from") == 1
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    tuned = tmp_path / "artifacts" / "published_prior" / "shapes.ckpt"
    module = load(tuned)
    before = torch.load(published["stage"], weights_only=True)["state_dict"]
    after = module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("net.prior.transformer_blocks"))
    assert torch.equal(before["img_std"], after["img_std"])  # the published stats survive the cache's setup
    assert module.hparams["source"] == "karlo" and module.sampler.steps == "linspace25"

    out = tmp_path / "compare"
    rows = run(compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, out)
                                + ["mode=compare", f"priors=[{stages['diffusion']},{published['stage']}]"]))
    ours = [r for r in rows if r["prior"] == "published_prior"]
    assert [r["settings"] for r in ours] == ["steps=linspace25 guidance_scale=4.0", "steps=linspace25 guidance_scale=1.0"]
    assert all(r["cos_true"] == r["cos_true"] for r in ours)  # computed, not NaN


def test_init_from_refuses_another_kind_and_weights_that_do_not_fit(published, stages, tiny_clip):  # noqa: F811
    from test_prior import DIFFUSION, SAMPLER, TINY_NET
    from unclip.modules.diffusion_prior import DiffusionPriorModule
    from unclip.training import init_weights

    native = DiffusionPriorModule(TINY_NET, DIFFUSION, SAMPLER, clip=tiny_clip)
    with pytest.raises(ValueError, match="is a 'published_prior' stage but this run trains 'diffusion_prior'"):
        init_weights(native, published["stage"])
    wider = DiffusionPriorModule({**TINY_NET, "dim": 64}, DIFFUSION, SAMPLER, clip=tiny_clip)
    with pytest.raises(ValueError, match=r"does not fit this run's diffusion_prior: missing none; unexpected none; "
                                         r"shapes \(stage vs run\) net\.blocks"):
        init_weights(wider, stages["diffusion"])
    init_weights(native, stages["diffusion"])  # a native stage of the same net loads
    assert torch.equal(native.state_dict()["net.query"], torch.load(stages["diffusion"], weights_only=True)["state_dict"]["net.query"])


def test_a_converted_prior_drives_the_pipeline(published, stages, tiny_clip, tmp_path):  # noqa: F811
    from unclip.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_checkpoints(decoder=stages["decoder"], prior=published["stage"], clip=tiny_clip)
    out = pipe.generate(["a red circle"], n=2, seed=0, prior_steps="linspace4", decoder_steps=2, negative_prompt="a square")
    assert out.pixels.shape[:2] == (2, 3) and torch.isfinite(out.pixels).all() and len(out.images) == 2
    again = UnCLIPPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "pipe"))
    assert again.prior.kind == "published_prior"
    assert torch.allclose(again.generate(["a red circle"], n=2, seed=0, prior_steps="linspace4", decoder_steps=2,
                                         negative_prompt="a square").pixels, out.pixels, atol=1e-5)
