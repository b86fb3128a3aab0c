"""UnCLIPPipeline with tiny random stages: shapes, seed determinism, every mode, CLIP mismatch refused,
save_pretrained / from_pretrained round trip."""

import pytest
import torch

from test_decoder import tiny_unet_config
from test_prior import DIFFUSION as PRIOR_DIFFUSION
from test_prior import TINY_NET
from unclip.modules.decoder import DecoderModule
from unclip.modules.diffusion_prior import DiffusionPriorModule
from unclip.pipeline import UnCLIPPipeline, slerp

DECODER_DIFFUSION = dict(schedule="cosine", num_timesteps=100, prediction="eps")


def save_stage(module, clip, path):
    """A checkpoint as training publishes it: hyperparameters (with the CLIP identity) and weights."""
    hparams = dict(module.hparams)
    hparams["clip"] = clip.identity()
    torch.save({"hyper_parameters": hparams, "state_dict": module.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def clip(tiny_clip, tmp_path_factory):
    """The tiny random CLIP saved to a file, as training publishes one, so stages can name it."""
    from unclip.clip import FrozenCLIP, save_published

    path = save_published(tiny_clip.model, tiny_clip.model_name, tmp_path_factory.mktemp("clip") / "tiny.pt")
    return FrozenCLIP(pretrained=str(path))


@pytest.fixture(scope="module")
def stages(clip, tmp_path_factory):
    folder = tmp_path_factory.mktemp("stages")
    torch.manual_seed(0)
    prior = DiffusionPriorModule(TINY_NET, PRIOR_DIFFUSION, dict(kind="ddim", steps=4), clip=clip)
    decoder = DecoderModule(tiny_unet_config(embed_dim=clip.embed_dim), DECODER_DIFFUSION,
                            dict(kind="ddim", steps=4, clip_denoised=True), clip=clip)
    for p in decoder.net.parameters():  # zero-initialised output layers would decode every z_i alike
        if torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.05)
    return {"prior": save_stage(prior, clip, folder / "prior.ckpt"),
            "decoder": save_stage(decoder, clip, folder / "decoder.ckpt"), "folder": folder}


@pytest.fixture(scope="module")
def pipe(stages):
    # no clip given: the pipeline rebuilds the CLIP from the decoder's identity (the published file)
    return UnCLIPPipeline.from_checkpoints(decoder=stages["decoder"], prior=stages["prior"])


def test_generate_shapes_and_seed_determinism(pipe, clip):
    out = pipe.generate(["a red circle", "a blue star"], n=3, seed=7)
    assert out.pixels.shape == (6, 3, 16, 16) and len(out.images) == 6
    assert out.images[0].size == (16, 16) and out.images[0].mode == "RGB"
    assert out.z_img.shape == (6, clip.embed_dim)
    torch.testing.assert_close(out.z_img.norm(dim=-1), torch.ones(6))
    again = pipe.generate(["a red circle", "a blue star"], n=3, seed=7)
    torch.testing.assert_close(out.pixels, again.pixels)
    other = pipe.generate(["a red circle", "a blue star"], n=3, seed=8)
    assert not torch.allclose(out.pixels, other.pixels)
    guided = pipe.generate(["a red circle"], n=1, seed=7, prior_guidance=3.0, decoder_guidance=2.0, prior_steps=2)
    assert guided.pixels.shape == (1, 3, 16, 16)


def test_variation_interpolation_and_text_diff(pipe):
    image = pipe.generate(["a red circle"], seed=0).images[0]
    other = pipe.generate(["a blue star"], seed=1).images[0]
    varied = pipe.vary(image, n=3, seed=0)
    assert varied.pixels.shape == (3, 3, 16, 16)
    assert not torch.allclose(varied.pixels[0], varied.pixels[1])  # new noise per variation
    kept = pipe.vary(image, n=2, seed=0, invert=True, eta=0.0)  # inverted latent, deterministic: identical rows
    torch.testing.assert_close(kept.pixels[0], kept.pixels[1])
    for invert in (False, True):
        path = pipe.interpolate(image, other, k=4, seed=0, invert=invert)
        assert path.pixels.shape == (4, 3, 16, 16)
        z_a, z_b = pipe.image_embeddings(image), pipe.image_embeddings(other)
        torch.testing.assert_close(path.z_img[0], z_a[0], atol=1e-5, rtol=1e-4)  # the path starts at a, ends at b
        torch.testing.assert_close(path.z_img[-1], z_b[0], atol=1e-5, rtol=1e-4)
    edit = pipe.text_diff(image, "a red circle", "a blue circle", k=3)
    assert edit.pixels.shape == (3, 3, 16, 16)
    torch.testing.assert_close(edit.z_img[0], pipe.image_embeddings(image)[0], atol=1e-5, rtol=1e-4)
    mixed = pipe.mix([image, "a blue star"], weights=[0.5, 0.5], n=2)
    assert mixed.pixels.shape == (2, 3, 16, 16)


def test_inverted_latents_decode_unguided_unless_asked(pipe, monkeypatch):
    """DDIM inversion runs unguided, so its latents reconstruct only when decoded unguided: with the
    decoder's default guidance (5 for the shapes decoder) an inverted start would drift."""
    image = pipe.generate(["a red circle"], seed=0).images[0]
    scales = []
    decode = pipe.decode
    monkeypatch.setattr(pipe, "decode", lambda z, g, guidance=None, *a, **kw: scales.append(guidance) or decode(z, g, guidance, *a, **kw))
    pipe.vary(image, n=1, invert=True)
    pipe.vary(image, n=1, invert=True, decoder_guidance=3.0)
    pipe.vary(image, n=1)
    pipe.interpolate(image, image, k=2, invert=True)
    pipe.text_diff(image, "a red circle", "a blue circle", k=2)  # inverts by default
    pipe.text_diff(image, "a red circle", "a blue circle", k=2, invert=False)
    assert scales == [1.0, 3.0, None, 1.0, 1.0, None]


def test_device_auto_picks_the_gpu_only_when_there_is_one(pipe, monkeypatch):
    from unclip.loading import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda") and pick_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipe.to("auto").device == torch.device("cpu") and pipe.clip.device == torch.device("cpu")


def test_bf16_sampling_runs_the_nets_in_bf16_and_stays_close_to_fp32(pipe, monkeypatch):
    from unclip.precision import resolve_precision

    seen = []
    forward = type(pipe.decoder.net).forward
    monkeypatch.setattr(type(pipe.decoder.net), "forward",
                        lambda self, *a, **kw: (seen.append(torch.is_autocast_enabled("cpu")), forward(self, *a, **kw))[1])
    fp32 = pipe.generate(["a red circle", "a blue star"], n=2, seed=3)
    assert seen and not any(seen)
    seen.clear()
    bf16 = UnCLIPPipeline(pipe.clip, pipe.decoder, pipe.prior, precision="bf16-mixed").generate(
        ["a red circle", "a blue star"], n=2, seed=3)
    assert seen and all(seen)
    assert bf16.pixels.dtype == torch.float32 and bf16.z_img.dtype == torch.float32
    assert 0 < (bf16.pixels - fp32.pixels).abs().mean() < 0.1  # bf16 rounding, not another picture
    assert resolve_precision("auto", "cuda") == "bf16-mixed"
    # auto stays auto until a device samples: a GPU pipeline built on a CPU without bf16 still samples in bf16
    assert UnCLIPPipeline(pipe.clip, pipe.decoder, pipe.prior, precision="auto").precision == "auto"
    assert pipe.decoder.net.input.weight.is_contiguous(memory_format=torch.channels_last)  # UNets sample in NHWC
    with pytest.raises(ValueError, match="precision must be one of"):
        UnCLIPPipeline(pipe.clip, pipe.decoder, pipe.prior, precision="bf16")


def test_an_upsampler_that_reads_z_i_gets_the_embeddings_the_images_were_decoded_from(pipe, clip, monkeypatch):
    from test_upsampler import tiny_upsampler

    upsampler = tiny_upsampler(image_size=32, lowres_size=16, image_cond=True, embed_dim=clip.embed_dim).eval()
    seen = []
    real_upsample = upsampler.upsample
    monkeypatch.setattr(upsampler, "upsample", lambda x, **kw: seen.append(kw.get("z_img")) or real_upsample(x, **kw))
    with_upsampler = UnCLIPPipeline(pipe.clip, pipe.decoder, pipe.prior, upsamplers=[upsampler])
    out = with_upsampler.generate(["a red circle", "a blue star"], n=1, seed=3)
    assert out.pixels.shape == (2, 3, 32, 32) and len(seen) == 1
    torch.testing.assert_close(seen[0].float().cpu(), out.z_img)
    # a conjunction's image: the mean of its parts' embeddings, unit norm
    parts, weights = torch.nn.functional.normalize(torch.randn(2, 1, clip.embed_dim), dim=-1), torch.full((2, 1), 0.5)
    with_upsampler.decode(parts, torch.Generator().manual_seed(0), captions=[["a red circle"], ["a blue star"]], weights=weights)
    torch.testing.assert_close(seen[1].float().cpu(), torch.nn.functional.normalize(parts.mean(0), dim=-1))


def test_slerp_is_spherical_and_hits_its_ends():
    a, b = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1), torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    mid = slerp(a, b, 0.5)
    torch.testing.assert_close(mid.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close((mid * a).sum(-1), (mid * b).sum(-1), atol=1e-5, rtol=1e-4)  # halfway in angle
    torch.testing.assert_close(slerp(a, b, 0.0), a, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(slerp(a, a, 0.3), a, atol=1e-6, rtol=1e-5)  # parallel vectors do not blow up


def test_a_stage_trained_with_another_clip_is_refused(stages, clip, tmp_path):
    other = torch.load(stages["prior"], weights_only=True)
    other["hyper_parameters"]["clip"] = {**clip.identity(), "sha256": "0" * 64}
    torch.save(other, tmp_path / "other_prior.ckpt")
    with pytest.raises(ValueError, match="share one CLIP|trained with CLIP"):
        UnCLIPPipeline.from_checkpoints(decoder=stages["decoder"], prior=tmp_path / "other_prior.ckpt")


def test_a_moved_outputs_folder_still_finds_its_clip_by_weights(stages, clip, tiny_clip, tmp_path):
    """A checkpoint records where its CLIP's weights were. After the outputs folder moves, the CLIP published
    beside the stage (ARTIFACTS/clip/NAME.pt) is used when its weights are the same, and refused otherwise."""
    import copy
    import shutil
    from pathlib import Path

    from unclip import load
    from unclip.clip import save_published

    moved = torch.load(stages["decoder"], weights_only=True)
    moved["hyper_parameters"]["clip"]["pretrained"] = str(tmp_path / "gone" / "artifacts" / "clip" / "tiny.pt")
    artifacts = tmp_path / "moved" / "artifacts"
    (artifacts / "decoder").mkdir(parents=True)
    torch.save(moved, artifacts / "decoder" / "shapes.ckpt")
    with pytest.raises(FileNotFoundError, match="tiny.pt"):  # nothing beside it yet: the missing file is named
        load(artifacts / "decoder" / "shapes.ckpt")
    (artifacts / "clip").mkdir()
    for suffix in (".pt", ".json"):
        shutil.copy(Path(clip.pretrained).with_suffix(suffix), artifacts / "clip" / f"tiny{suffix}")
    decoder = load(artifacts / "decoder" / "shapes.ckpt")
    assert decoder.clip.identity()["sha256"] == clip.identity()["sha256"]

    other = copy.deepcopy(tiny_clip.model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    save_published(other, tiny_clip.model_name, artifacts / "clip" / "tiny.pt")
    with pytest.raises(ValueError, match="trained with CLIP"):
        load(artifacts / "decoder" / "shapes.ckpt")


def test_save_and_load_pretrained_round_trip(pipe, tmp_path, clip):
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = UnCLIPPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.clip.identity()["sha256"] == clip.identity()["sha256"]
    torch.testing.assert_close(loaded.generate("a red circle", n=2, seed=3).pixels, pipe.generate("a red circle", n=2, seed=3).pixels)


def compose_sample(overrides):
    import os

    from hydra import compose, initialize_config_dir

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        return compose("sample", overrides=overrides)


def test_sample_cli_writes_a_grid_and_settings_for_each_mode(stages, pipe, tmp_path):
    import json

    from PIL import Image

    from unclip.sampling import sample

    base = [f"prior={stages['prior']}", f"decoder={stages['decoder']}", f"out={tmp_path}", "progress=false"]
    grid = sample(compose_sample(base + ["prompts=[a red circle,a blue star]", "n=3"]))
    assert Image.open(grid).size == (3 * 18 + 2, 2 * 18 + 2)  # 3 per row, 2 rows of 16 px with 2 px padding
    settings = json.loads(grid.with_suffix(".json").read_text())
    assert settings["rows"] == ["a red circle", "a blue star"] and settings["prior"] == "diffusion_prior"
    image = tmp_path / "input.png"
    pipe.generate("a red circle").images[0].save(image)
    for mode, extra in [("vary", ["n=2"]), ("interpolate", [f"images=[{image},{image}]", "k=3"]),
                        ("text_diff", ["caption_from=a red circle", "caption_to=a blue circle", "k=3"])]:
        images = [] if mode == "interpolate" else [f"images=[{image}]"]
        assert sample(compose_sample(base + [f"mode={mode}", *images, *extra])).exists()
    with pytest.raises(ValueError, match="needs 2 image"):
        sample(compose_sample(base + ["mode=interpolate", f"images=[{image}]"]))
