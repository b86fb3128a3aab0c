"""train.py end to end on tiny shards: checkpoints, logs, publishing, resume and a multirun."""

import csv
from pathlib import Path

import pytest
import torch

from helpers import logged_keys
from test_config import run_cli


def common(shapes_dir, root):
    return [f"paths.root={root}", f"data.train={shapes_dir}/train-*.tar", f"data.val={shapes_dir}/val-*.tar",
            f"data.val_unseen={shapes_dir}/val_unseen-*.tar", "data.batch_size=16", "data.val_batch_size=24",
            "data.num_workers=0", "trainer.val_check_interval=2", "trainer.log_every_n_steps=1",
            "trainer.enable_progress_bar=false", "optim.warmup_steps=1"]


@pytest.mark.slow
def test_train_writes_checkpoints_logs_and_artifact_and_resumes(shapes_dir, tmp_path):
    args = common(shapes_dir, tmp_path) + ["model=clip_pretrain", "run.name=tiny"]
    first = run_cli(*args, "trainer.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "runs" / "shapes" / "clip_pretrain" / "tiny"
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / ".hydra" / "config.yaml").exists()
    assert (tmp_path / "artifacts" / "clip" / "shapes.pt").exists() and (tmp_path / "artifacts" / "clip" / "shapes.json").exists()
    keys = logged_keys(run)
    assert {"train/loss", "val/clip/retrieval_top1", "val/clip/retrieval_top1_unseen", "val/clip/zeroshot_shape"} <= keys
    # the same command with a longer run resumes from last.ckpt in the same directory
    second = run_cli(*args, "trainer.max_steps=4")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr + second.stdout
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4


@pytest.mark.slow
def test_multirun_gives_one_directory_per_override_set(shapes_dir, tmp_path):
    result = run_cli("-m", *common(shapes_dir, tmp_path), "model=clip_pretrain", "trainer.max_steps=1", "publish=false",
                     "optim.optimizer.lr=1e-4,3e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted((tmp_path / "runs" / "shapes" / "clip_pretrain").iterdir())
    assert len(runs) == 2 and all((run / "checkpoints" / "last.ckpt").exists() for run in runs)
    configs = sorted((run / ".hydra" / "overrides.yaml").read_text() for run in runs)
    assert "optim.optimizer.lr=0.0001" in configs[0] + configs[1] and "optim.optimizer.lr=0.0003" in configs[0] + configs[1]


@pytest.mark.slow
def test_diffusion_prior_trains_from_the_cache_and_resumes_with_its_ema(shapes_dir, embed_cfg, cache_dir):
    root = Path(embed_cfg.paths.root)  # the session cache lives under this root, made with clip=unclip_tiny
    args = common(shapes_dir, root) + ["model=diffusion_prior", "clip=unclip_tiny", "run.name=prior", "model.module.net.dim=32",
                                       "model.module.net.depth=1", "model.module.net.heads=2", "model.module.val_pool=24",
                                       "sampler.steps=4", "diffusion.num_timesteps=50", "trainer.val_check_interval=3"]
    first = run_cli(*args, "trainer.max_steps=3")
    assert first.returncode == 0, first.stderr[-3000:]
    run = root / "runs" / "shapes" / "diffusion_prior" / "prior"
    keys = logged_keys(run)
    assert {"train/loss", "val/loss", "val/prior/cos_true", "val/prior/retrieval_top1_unseen",
            "val/baseline_zt/cos_true", "val/baseline_linear/retrieval_top1"} <= keys
    published = torch.load(root / "artifacts" / "diffusion_prior" / "shapes.ckpt", map_location="cpu", weights_only=True)
    assert published["hyper_parameters"]["kind"] == "diffusion_prior" and "net.out.weight" in published["state_dict"]
    before = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    second = run_cli(*args, "trainer.max_steps=5")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from" in second.stderr + second.stdout
    after = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == 5
    # the EMA kept averaging where it stopped, from the restored raw weights
    ema_state = next(v for k, v in after["callbacks"].items() if "NetEMA" in k)
    assert ema_state["n_averaged"] == 5
    assert not torch.equal(before["current_model_state"]["net.out.weight"], after["current_model_state"]["net.out.weight"])


@pytest.mark.slow
def test_ar_prior_trains_from_the_cache_and_reports_its_tokenisation(shapes_dir, embed_cfg, cache_dir):
    root = Path(embed_cfg.paths.root)
    args = common(shapes_dir, root) + ["model=ar_prior", "clip=unclip_tiny", "run.name=ar", "model.module.net.dim=32",
                                       "model.module.net.depth=1", "model.module.net.heads=2", "model.module.val_pool=24",
                                       "model.module.tokenizer.components=8", "model.module.tokenizer.bins=16",
                                       "trainer.val_check_interval=3", "trainer.max_steps=3"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    run = root / "runs" / "shapes" / "ar_prior" / "ar"
    keys = logged_keys(run)
    assert {"train/loss", "val/prior/cos_true", "val/prior/retrieval_top1_unseen", "val/baseline_linear/cos_true",
            "val/ar_prior/roundtrip_cos", "val/ar_prior/explained_variance"} <= keys
    published = torch.load(root / "artifacts" / "ar_prior" / "shapes.ckpt", map_location="cpu", weights_only=True)
    state = published["state_dict"]
    assert published["hyper_parameters"]["kind"] == "ar_prior" and state["tokenizer.basis"].shape == (8, 128)
    assert float(state["tokenizer.explained"]) > 0 and state["tokenizer.centres"].abs().sum() > 0


def run_script(script, *args, timeout=300):
    import os
    import subprocess
    import sys

    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, script, *args], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_compare_priors_writes_one_table_with_both_priors_and_baselines(shapes_dir, embed_cfg, cache_dir, tmp_path):
    root = Path(embed_cfg.paths.root)
    tiny = ["clip=unclip_tiny", "model.module.net.dim=32", "model.module.net.depth=1", "model.module.net.heads=2",
            "trainer.max_steps=2", "trainer.limit_val_batches=0", f"paths.artifacts={tmp_path}/artifacts"]
    for model, extra in (("diffusion_prior", ["diffusion.num_timesteps=50"]), ("ar_prior", ["model.module.tokenizer.components=8"])):
        result = run_cli(*common(shapes_dir, root), f"model={model}", f"run.name=compare_{model}", *tiny, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    data = [f"paths.root={root}", f"paths.artifacts={tmp_path}/artifacts", "clip=unclip_tiny",
            f"data.val={shapes_dir}/val-*.tar", f"data.val_unseen={shapes_dir}/val_unseen-*.tar", f"data.train={shapes_dir}/train-*.tar"]
    # the diffusion prior's settings from the command line; the AR prior's from its model config's eval block,
    # which its checkpoint carries (conf/model/ar_prior.yaml: three settings)
    result = run_script("evaluate.py", "mode=compare", "priors=[diffusion,ar]", "pool=16", f"out={tmp_path}/eval", *data,
                        "+eval.diffusion_prior.settings=[{steps: 4}, {steps: 8}]")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "eval" / "results.csv")))
    assert [(r["prior"], r["settings"]) for r in rows] == [
        ("baseline_zt", "-"), ("baseline_linear", "-"), ("diffusion_prior", "steps=4"), ("diffusion_prior", "steps=8"),
        ("ar_prior", "guidance_scale=1.0"), ("ar_prior", "guidance_scale=2.0"), ("ar_prior", "guidance_scale=1.0 top_p=0.9")]
    assert all(r["cos_true"] and r["retrieval_top1_unseen"] for r in rows)
    assert float(rows[0]["cos_text"]) == pytest.approx(1.0, abs=1e-4)  # z_t as ẑ_i: cos with z_t is 1 by definition
    assert (tmp_path / "eval" / "results.md").exists() and (tmp_path / "eval" / "cost.png").stat().st_size > 1000
