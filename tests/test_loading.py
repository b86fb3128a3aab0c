"""``unclip.load`` on files that are not stage checkpoints: a named error, never a bare torch traceback."""

import pytest
import torch

from test_prior import DIFFUSION, SAMPLER, TINY_NET
from unclip.loading import CheckpointError, load


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    """A tiny diffusion prior saved as training publishes it (hyperparameters with the CLIP identity, EMA weights)."""
    from unclip.modules.diffusion_prior import DiffusionPriorModule

    module = DiffusionPriorModule(TINY_NET, DIFFUSION, SAMPLER, clip=None, use_token_states=False)
    path = tmp_path_factory.mktemp("stage") / "prior.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, path)
    return path


def test_a_real_stage_loads(stage):
    module = load(stage)
    assert module.kind == "diffusion_prior" and not module.training


@pytest.mark.parametrize("damage", ["garbage", "empty", "truncated"])
def test_an_unreadable_file_is_named_as_not_a_checkpoint(stage, tmp_path, damage):
    data = stage.read_bytes()
    bad = tmp_path / f"{damage}.ckpt"
    bad.write_bytes({"garbage": b"not a checkpoint\x00\xff" * 64, "empty": b"", "truncated": data[:len(data) // 2]}[damage])
    with pytest.raises(CheckpointError, match="is not a readable unclip checkpoint") as error:
        load(bad)
    assert str(bad) in str(error.value) and "truncated" in str(error.value)
    assert isinstance(error.value, ValueError)  # callers catching ValueError keep working


def test_a_torch_file_that_is_not_a_stage_is_named(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"a": torch.zeros(1)}, plain)
    with pytest.raises(CheckpointError, match="not an unclip stage checkpoint") as error:
        load(plain)
    assert str(plain) in str(error.value) and "'a'" in str(error.value)  # what it does hold
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(CheckpointError, match="not an unclip stage checkpoint"):
        load(tensor)
