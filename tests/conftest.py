"""Tiny fixtures built once per test session: shapes shards, a random tiny CLIP, its embedding cache."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HYDRA_FULL_ERROR", "1")

import pytest
import torch

from unclip.data.shapes import ShapesConfig, write_shapes

# two threads on this 2-core machine, unless the caller asked for fewer (a shared machine: two threads
# contending for one free core make the diffusion loops many times slower)
torch.set_num_threads(min(2, int(os.environ.get("OMP_NUM_THREADS") or 2)))


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    write_shapes(ShapesConfig(out=str(out), n=96, n_val=24, n_val_unseen=24, shards=4, size=64, seed=1))
    return out


@pytest.fixture(scope="session")
def tiny_clip():
    from unclip.clip import FrozenCLIP

    return FrozenCLIP("unclip-tiny")  # clip=unclip_tiny: random weights from init_seed 0, as every command builds it


@pytest.fixture(scope="session")
def embed_cfg(shapes_dir, tmp_path_factory):
    """The embed config composed as the CLI would, pointed at the tiny shards and a random tiny CLIP."""
    from hydra import compose, initialize_config_dir

    root = tmp_path_factory.mktemp("outputs")
    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        return compose("embed", overrides=[f"paths.root={root}", f"paths.data={shapes_dir.parent}",
                                           f"data.train={shapes_dir}/train-*.tar", f"data.val={shapes_dir}/val-*.tar",
                                           f"data.val_unseen={shapes_dir}/val_unseen-*.tar",
                                           "clip=unclip_tiny", "batch_size=32", "chunk_size=10", "progress=false"])


@pytest.fixture(scope="session")
def cache_dir(embed_cfg):
    from unclip.embed import embed

    embed(embed_cfg)
    return embed_cfg.data.cache_dir
