"""``python -m unclip.convert kind=dalle2_pytorch_prior``: DALLE2-pytorch DiffusionPrior weights + config (LAION's
released priors' format) become ``dalle2_pytorch_prior`` stages whose net, null branch, guided net, one guided
``p_sample`` step and a whole guided ``p_sample_loop`` equal DALLE2-pytorch's recorded outputs
(``tests/fixtures/laion_prior/``, written by ``bench/check_laion_prior.py peer``), and live when the peer venv is
there; the stage opens with ``unclip.load``, samples through the pipeline with guidance, names its CLIP, and bad
folders get named errors and no file."""

import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.check_laion_prior import TOLERANCE, compare_folder
from unclip.convert import ConversionError, convert
from unclip.diffusion import make_betas
from unclip.loading import load
from unclip.nets.dalle2_prior import Dalle2Prior, from_dalle2_names

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "laion_prior"
PEER = ROOT / "bench" / ".venv-peer" / "bin" / "python"
TINY_CLIP = {"clip_model": "unclip-tiny", "clip_pretrained": "none"}  # random tiny CLIP: embed 128, width 128, 32 tokens
TINY_NET = dict(dim=128, depth=1, dim_head=16, heads=2, ff_mult=1, num_timesteps=20, max_text_len=32, normformer=True)
TINY_PRIOR = dict(image_embed_dim=128, image_size=64, timesteps=20, cond_drop_prob=0.1, predict_x_start=True,
                  beta_schedule="cosine", condition_on_text_encodings=True)

# this net's names -> DALLE2-pytorch's (the inverse of unclip.nets.dalle2_prior.DALLE2_NAMES), to write a
# DALLE2-pytorch state dict at the tiny CLIP's sizes without DALLE2-pytorch
TO_DALLE2 = [(r"^text_embeds_proj\.", "to_text_embeds.0."), (r"^image_embeds_proj\.", "to_image_embeds.0."),
             (r"^time_embed\.weight$", "to_time_embeds.0.weight"), (r"^query$", "learned_query"),
             (r"^null_text_tokens$", "null_text_encodings"), (r"^norm_in\.", "causal_transformer.init_norm."),
             (r"^rel_pos_bias\.", "causal_transformer.rel_pos_bias.relative_attention_bias."),
             (r"^blocks\.(\d+)\.attn\.rotary_freqs$", r"causal_transformer.layers.\1.0.rotary_emb.freqs"),
             (r"^blocks\.(\d+)\.attn\.to_out\.", r"causal_transformer.layers.\1.0.to_out.0."),
             (r"^blocks\.(\d+)\.attn\.out_norm\.", r"causal_transformer.layers.\1.0.to_out.1."),
             (r"^blocks\.(\d+)\.attn\.", r"causal_transformer.layers.\1.0."),
             (r"^blocks\.(\d+)\.ff\.norm\.", r"causal_transformer.layers.\1.1.0."),
             (r"^blocks\.(\d+)\.ff\.proj_in\.", r"causal_transformer.layers.\1.1.1."),
             (r"^blocks\.(\d+)\.ff\.post_norm\.", r"causal_transformer.layers.\1.1.3."),
             (r"^blocks\.(\d+)\.ff\.proj_out\.", r"causal_transformer.layers.\1.1.5."),
             (r"^norm_out\.", "causal_transformer.norm."), (r"^project_out\.", "causal_transformer.project_out.")]


def dalle2_name(name: str) -> str:
    for pattern, replacement in TO_DALLE2:
        new, hits = re.subn(pattern, replacement, name)
        if hits:
            return new
    return name


def dalle2_prior_state(seed: int, net: dict = TINY_NET, prior: dict = TINY_PRIOR) -> dict:
    """A DiffusionPrior state dict: a random net under DALLE2-pytorch's names, and the noise scheduler's betas."""
    torch.manual_seed(seed)
    ours = Dalle2Prior({**net, "embed_dim": net["dim"], "text_width": net["dim"], "max_text_tokens": 32})
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    state = {f"net.{dalle2_name(k)}": v for k, v in ours.state_dict().items()}
    state["noise_scheduler.betas"] = make_betas(prior["beta_schedule"], prior["timesteps"]).float()
    return state


def write_folder(folder: Path, net: dict = TINY_NET, prior: dict = TINY_PRIOR, state: dict | None = None) -> Path:
    """LAION's layout: a trainer save (EMA and online weights, optimiser bits) beside TrainDiffusionPriorConfig's JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    ema = dalle2_prior_state(0, net, prior) if state is None else state
    online = dalle2_prior_state(1, net, prior)
    torch.save({"model": online, "ema_model": ema, "version": "1.15.6", "step": 3}, folder / "best.pth")
    (folder / "prior_config.json").write_text(json.dumps({"prior": {**prior, "net": net,
                                                                    "clip": {"make": "openai", "model": "ViT-L/14"}}}))
    return folder


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    folder = write_folder(tmp_path_factory.mktemp("laion") / "prior")
    return {"folder": folder, "stage": convert("dalle2_pytorch_prior", folder.parent, folder.parent / "laion.ckpt", **TINY_CLIP)}


# ------------------------------------------------------------------------------ against DALLE2-pytorch
def test_the_fixture_names_map_one_to_one_and_back():
    state = torch.load(FIXTURE / "best.pth", weights_only=True)
    net = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
    renamed = from_dalle2_names(net)
    assert len(renamed) == len(net) and {dalle2_name(k) for k in renamed} == set(net)


def test_the_converted_prior_equals_dalle2_pytorchs_recorded_outputs(tmp_path):
    diffs = compare_folder(FIXTURE, tmp_path / "fixture.ckpt")
    print("max abs differences vs DALLE2-pytorch:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert set(diffs) == {"net", "net_null", "net_guided", "step", "sample"}
    assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.slow
@pytest.mark.skipif(not PEER.exists(), reason="no bench/.venv-peer (make bench/.venv-peer/.installed builds it)")
def test_live_against_dalle2_pytorch(tmp_path):
    script = str(ROOT / "bench" / "check_laion_prior.py")
    peer = subprocess.run([str(PEER), script, "peer", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert peer.returncode == 0, peer.stderr[-3000:]
    ours = subprocess.run([sys.executable, script, "compare", str(tmp_path)], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    print(ours.stdout)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-3000:]
    assert ours.stdout.count("max|sample|") == 3  # every variant compared


# ------------------------------------------------------------------------------------- the stage
def test_the_stage_opens_with_unclip_load_from_the_ema_weights(laion, tiny_clip):
    checkpoint = torch.load(laion["stage"], weights_only=True)
    hparams = checkpoint["hyper_parameters"]
    assert hparams["kind"] == "dalle2_pytorch_prior" and hparams["clip"]["model"] == "unclip-tiny"
    assert hparams["diffusion"] == {"schedule": "cosine", "num_timesteps": 20, "prediction": "x0", "variance": "fixed_small"}
    assert hparams["sampler"]["kind"] == "ddpm" and hparams["sampler"]["steps"] == 20
    module = load(laion["stage"], clip=tiny_clip)
    assert type(module).__name__ == "Dalle2PriorModule" and module.best_of == 2
    ema = {k.removeprefix("net."): v for k, v in dalle2_prior_state(0).items() if k.startswith("net.")}
    assert torch.equal(module.net.state_dict()["query"], ema["learned_query"])  # the EMA copy, not the online one
    assert torch.allclose(module.img_std, torch.full((128,), 1 / math.sqrt(128)))  # image_embed_scale = sqrt(dim)
    assert torch.equal(module.txt_std, torch.ones(128))


def test_a_converted_prior_samples_with_guidance_through_the_pipeline(laion, tiny_clip, tmp_path):
    from test_decoder import tiny_unet_config
    from test_pipeline import DECODER_DIFFUSION, save_stage
    from unclip.modules.decoder import DecoderModule
    from unclip.pipeline import UnCLIPPipeline

    module = load(laion["stage"], clip=tiny_clip)
    cond = module.condition({"txt_emb": tiny_clip.encode_text(["a red circle", "a blue square"]).z_txt,
                             "caption": ["a red circle", "a blue square"]})
    guided = module.sample(cond, torch.Generator().manual_seed(0), guidance_scale=4.0, steps=5)
    plain = module.sample(cond, torch.Generator().manual_seed(0), guidance_scale=1.0, steps=5)
    assert guided.shape == (2, 128) and torch.allclose(guided.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-3)  # guidance changes the draw
    decoder = DecoderModule(tiny_unet_config(embed_dim=128), DECODER_DIFFUSION, dict(kind="ddim", steps=2), clip=tiny_clip)
    pipe = UnCLIPPipeline.from_checkpoints(decoder=save_stage(decoder, tiny_clip, tmp_path / "decoder.ckpt"),
                                           prior=laion["stage"], clip=tiny_clip)
    out = pipe.generate(["a red circle"], n=2, seed=0, prior_steps=4, prior_guidance=2.0, decoder_steps=2,
                        negative_prompt="a square")
    assert out.pixels.shape[:2] == (2, 3) and torch.isfinite(out.pixels).all()


def test_another_clip_is_refused_naming_both(laion):
    from unclip.clip import FrozenCLIP

    with pytest.raises(ValueError, match="expects CLIP unclip-tiny with pretrained=None, not unclip-tiny-32"):
        load(laion["stage"], clip=FrozenCLIP("unclip-tiny-32"))


def test_without_condition_dropout_guidance_is_refused(tmp_path, tiny_clip):
    folder = write_folder(tmp_path / "nodrop", prior={**TINY_PRIOR, "cond_drop_prob": 0.0})
    module = load(convert("dalle2_pytorch_prior", folder, tmp_path / "nodrop.ckpt", **TINY_CLIP), clip=tiny_clip)
    cond = module.condition({"txt_emb": tiny_clip.encode_text(["a"]).z_txt, "caption": ["a"]})
    with pytest.raises(ValueError, match="trained without condition dropout"):
        module.sample(cond, guidance_scale=2.0, steps=3)
    assert module.sample(cond, guidance_scale=1.0, steps=3).shape == (1, 128)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_folders_get_named_errors_and_write_nothing(tmp_path, laion):
    out = tmp_path / "out.ckpt"
    with pytest.raises(ConversionError, match="unknown kind 'dalle2_prior'; known kinds: dalle2_pytorch_prior"):
        convert("dalle2_prior", laion["folder"], out)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(laion["folder"] / "prior_config.json", no_weights)
    with pytest.raises(ConversionError, match=r"has no best.pth or latest.pth.*DiffusionPrior weights"):
        convert("dalle2_pytorch_prior", no_weights, out, **TINY_CLIP)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    shutil.copy(laion["folder"] / "best.pth", no_config)
    with pytest.raises(ConversionError, match="has no prior_config.json or config.json"):
        convert("dalle2_pytorch_prior", no_config, out, **TINY_CLIP)
    # a config that does not describe its weights: the mismatched tensors are named
    deeper = write_folder(tmp_path / "deeper", state=dalle2_prior_state(0))
    config = json.loads((deeper / "prior_config.json").read_text())
    config["prior"]["net"].update(depth=2, ff_mult=2)
    (deeper / "prior_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"do not match its config: missing blocks\.1\.attn.*shapes \(weights vs "
                                              r"config\) .*blocks\.0\.ff\.proj_in\.weight \(256, 128\) vs \(512, 128\)"):
        convert("dalle2_pytorch_prior", deeper, out, **TINY_CLIP)
    config["prior"]["net"].update(depth=1, ff_mult=1)
    config["prior"]["beta_schedule"] = "linear"
    (deeper / "prior_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="noise_scheduler.betas .* are not those of .*beta_schedule=linear"):
        convert("dalle2_pytorch_prior", deeper, out, **TINY_CLIP)
    config["prior"]["net"]["self_cond"] = True
    (deeper / "prior_config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="sets net.self_cond: self-conditioning"):
        convert("dalle2_pytorch_prior", deeper, out, **TINY_CLIP)
    # LAION's own CLIP (ViT-L-14, 768) does not fit the tiny prior: refused by name
    with pytest.raises(ConversionError, match="CLIP ViT-L-14 gives embed_dim 768"):
        convert("dalle2_pytorch_prior", laion["folder"], out)
    config["prior"]["net"]["self_cond"] = False
    (deeper / "prior_config.json").write_text(json.dumps(config))
    (deeper / "best.pth").write_bytes(b"not weights")
    with pytest.raises(ConversionError, match="does not read as weights"):
        convert("dalle2_pytorch_prior", deeper, out, **TINY_CLIP)
    assert not out.exists() and not list(tmp_path.glob(".out.ckpt*"))


def test_the_command_line_converts_the_published_layout(laion, tmp_path):
    out = tmp_path / "cli.ckpt"
    run = subprocess.run([sys.executable, "-m", "unclip.convert", "kind=dalle2_pytorch_prior", f"src={laion['folder'].parent}",
                          f"out={out}", "weights=best.pth", "clip_model=unclip-tiny", "clip_pretrained=none"],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert out.exists() and "wrote" in run.stdout
