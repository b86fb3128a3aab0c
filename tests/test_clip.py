import open_clip
import pytest
import torch
import torch.nn.functional as F

from unclip.clip import FrozenCLIP, save_published

CAPTIONS = ["a small red circle in the top left", "bottom: huge azure star", "a disc"]


def test_pooled_text_matches_open_clip_and_token_states_have_masks(tiny_clip):
    encoding = tiny_clip.encode_text(CAPTIONS)
    reference = F.normalize(tiny_clip.model.encode_text(tiny_clip.tokenize(CAPTIONS)), dim=-1)
    assert torch.allclose(encoding.z_txt, reference, atol=1e-5)
    assert encoding.tokens.shape == (3, tiny_clip.context_length, tiny_clip.text_width)
    assert encoding.mask.shape == (3, tiny_clip.context_length) and encoding.mask.dtype == torch.bool
    lengths = encoding.mask.sum(1)
    assert lengths[2] < lengths[0] and lengths[2] == 4  # <start> a disc <end>
    assert torch.allclose(encoding.z_txt.norm(dim=-1), torch.ones(3))


def test_image_tensor_path_matches_open_clip_preprocess(tiny_clip):
    from PIL import Image

    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    images = [Image.fromarray(((p.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for p in pixels]
    z_tensor, z_pil = tiny_clip.encode_image(pixels), tiny_clip.encode_image(images)
    assert z_tensor.shape == (2, tiny_clip.embed_dim)
    assert torch.allclose(z_tensor, z_pil, atol=2e-3)


def test_frozen(tiny_clip):
    assert not any(p.requires_grad for p in tiny_clip.model.parameters()) and not tiny_clip.model.training
    assert not isinstance(tiny_clip, torch.nn.Module)  # never registered, averaged or checkpointed by a module


def test_local_checkpoint_round_trip_keeps_identity(tiny_clip, tmp_path):
    path = save_published(tiny_clip.model, "unclip-tiny", tmp_path / "mine.pt")
    assert path.with_suffix(".json").exists()
    loaded = FrozenCLIP(pretrained=str(path))  # the model name comes from the published JSON
    assert loaded.identity()["sha256"] == tiny_clip.identity()["sha256"]
    assert torch.allclose(loaded.encode_text(CAPTIONS).z_txt, tiny_clip.encode_text(CAPTIONS).z_txt)
    # plain open_clip loads the published pair as well
    open_clip.add_model_config(path.with_suffix(".json"))
    model = open_clip.create_model("mine", pretrained=str(path))
    assert torch.equal(model.token_embedding.weight, tiny_clip.model.token_embedding.weight)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    save_published(loaded.model, "mine", moved / "copy.pt")
    assert FrozenCLIP(pretrained=str(moved / "copy.pt")).identity()["sha256"] == tiny_clip.identity()["sha256"]


def test_real_model_names_build_with_random_weights_offline():
    clip = FrozenCLIP("ViT-B-32", pretrained=None)
    assert clip.embed_dim == 512 and clip.image_size == 224 and clip.context_length == 77
    assert clip.encode_text(["a red circle"]).tokens.shape == (1, 77, 512)


def test_missing_weights_and_names_are_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        FrozenCLIP("unclip-tiny", pretrained=str(tmp_path / "absent.pt"))
    with pytest.raises(ValueError, match="model_name is required"):
        FrozenCLIP()
    with pytest.raises(ValueError, match="precision"):
        FrozenCLIP("unclip-tiny", precision="fp8")


BUILD_FROM_CONFIG = """
import json, sys
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

torch.manual_seed(int(sys.argv[1]))  # whatever the global generator holds must not matter
torch.rand(int(sys.argv[2]))
with initialize_config_dir(config_dir=sys.argv[3], version_base="1.3"):
    cfg = compose("train", overrides=["clip=unclip_tiny", *sys.argv[4:]])
before = torch.get_rng_state()
clip = instantiate(cfg.clip, _convert_="all")
print(json.dumps({"identity": clip.identity(), "rng_untouched": torch.equal(before, torch.get_rng_state())}))
"""


def build_clip_in_subprocess(global_seed: int, draws: int, *overrides: str) -> dict:
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", BUILD_FROM_CONFIG, str(global_seed), str(draws), str(root / "conf"), *overrides],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_random_clip_is_the_same_weights_in_every_process():
    # `python embed.py clip=unclip_tiny` then `python train.py clip=unclip_tiny`: two processes, two
    # global RNG states, one CLIP
    first = build_clip_in_subprocess(1, 3)
    second = build_clip_in_subprocess(2, 17)
    assert first["identity"]["sha256"] == second["identity"]["sha256"]
    assert first["identity"]["pretrained"] is None and first["identity"]["random_init_seed"] == 0
    assert first["rng_untouched"] and second["rng_untouched"]  # building it leaves the caller's generator alone
    other = build_clip_in_subprocess(1, 3, "clip.init_seed=1")
    assert other["identity"]["sha256"] != first["identity"]["sha256"] and other["identity"]["random_init_seed"] == 1


def test_a_clip_with_weights_is_not_called_random(tiny_clip, tmp_path):
    path = save_published(tiny_clip.model, "unclip-tiny", tmp_path / "mine.pt")
    identity = FrozenCLIP(pretrained=str(path)).identity()
    assert identity["pretrained"] == str(path) and identity["random_init_seed"] is None
    assert identity["sha256"] == tiny_clip.identity()["sha256"]


def test_a_stage_names_its_random_clip_by_seed_and_loading_rebuilds_it():
    from unclip.loading import clip_from_identity

    identity = FrozenCLIP("unclip-tiny", init_seed=3).identity()
    assert clip_from_identity(identity).identity() == identity
