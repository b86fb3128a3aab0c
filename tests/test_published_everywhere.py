"""Converted published stages work where native ones do: karlo's whole converted stack through ``sample.py``
(generate and vary), and converted karlo and LAION priors as leaderboard rows beside a native prior, scored
on the same pools and seeds."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_convert_karlo import write_karlo
from test_convert_laion import write_folder
from test_leaderboard import compose_evaluate, stages, tiny_overrides  # noqa: F401  (stages: a fixture)
from unclip.convert import convert
from unclip.eval.run import run

pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {"clip_model": "unclip-tiny", "clip_pretrained": "none"}


def karlo_folder(tmp_path: Path) -> Path:
    write_karlo(tmp_path / "karlo")
    return tmp_path / "karlo"


@pytest.mark.slow
def test_sample_py_runs_the_converted_karlo_stack(tmp_path):
    stages_dir = convert("karlo", karlo_folder(tmp_path), tmp_path / "stages", **TINY_CLIP)
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    common = [f"paths.root={tmp_path}", f"prior={stages_dir / 'prior.ckpt'}", f"decoder={stages_dir / 'decoder.ckpt'}",
              f"upsamplers=[{stages_dir / 'upsampler.ckpt'}]", "prior_steps=3", "decoder_steps=3",
              "upsampler_steps=3", "progress=false", "n=2", "device=cpu"]
    made = subprocess.run([sys.executable, "sample.py", *common, "prompts=[a red circle]", f"out={tmp_path / 'gen'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    grids = list((tmp_path / "gen").glob("*.png"))
    assert grids and grids[0].stat().st_size > 100
    varied = subprocess.run([sys.executable, "sample.py", *common, "mode=vary", f"images=[{grids[0]}]",
                             f"out={tmp_path / 'vary'}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert varied.returncode == 0, varied.stderr[-3000:]
    assert list((tmp_path / "vary").glob("*.png"))


@pytest.mark.slow
def test_converted_priors_are_leaderboard_rows_beside_a_native_prior(shapes_dir, cache_dir, stages, tmp_path):  # noqa: F811
    karlo = convert("karlo", karlo_folder(tmp_path), tmp_path / "karlo.ckpt", **TINY_CLIP)
    laion = convert("dalle2_pytorch_prior", write_folder(tmp_path / "laion"), tmp_path / "laion.ckpt", **TINY_CLIP)
    one_setting = "{sweep: {guidance_scale: [1, 2], steps: [3]}, image_setting: {guidance_scale: 2, steps: 3}}"
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + [
        "mode=leaderboard", f"priors=[{stages['diffusion']},{karlo},{laion}]",
        "+eval.diffusion_prior={sweep: {guidance_scale: [1], steps: [2]}, image_setting: {guidance_scale: 1, steps: 2}}",
        f"+eval.published_prior={one_setting}", f"+eval.dalle2_pytorch_prior={one_setting}",
        "grid_prompts=2", "grid_n=1", "wandb=false"])
    run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    priors = [r["prior"] for r in rows]
    assert priors.count("published_prior") == 2 and priors.count("dalle2_pytorch_prior") == 2
    assert "diffusion_prior" in priors and "baseline_zt" in priors
    for r in rows:  # every row scored on both splits
        assert r["cos_true"] and r["cos_true_unseen"], r
    chosen = [r for r in rows if r["image_setting"] == "True"]
    assert {r["prior"] for r in chosen} >= {"published_prior", "dalle2_pytorch_prior", "diffusion_prior"}
    assert all(r["attr_acc"] != "" for r in chosen)
    assert (tmp_path / "grid_published_prior.png").exists() and (tmp_path / "grid_dalle2_pytorch_prior.png").exists()
