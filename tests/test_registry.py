"""The registry of stage kinds: built-in kinds register themselves, and a fourth prior defined outside
unclip (``tests/fourth_prior``: a net file, a module file and a model config) trains through ``train.py``,
then runs through ``mode=compare`` and the leaderboard with no edit anywhere in unclip."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

import unclip.modules  # noqa: F401  (the built-in stages)
from test_leaderboard import compose_evaluate, stages, tiny_overrides  # noqa: F401  (stages: a fixture)
from test_train_cli import common
from unclip import registry
from unclip.eval.run import run

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_builtin_kinds_register_themselves_with_their_aliases():
    assert registry.prior_kinds() == ["ar_prior", "contrastive_prior", "dalle2_pytorch_prior", "diffusion_prior", "published_prior"]
    assert {"decoder", "upsampler", "clip"} <= set(registry.STAGES)
    assert registry.canonical("diffusion") == "diffusion_prior" and registry.canonical("decoder") == "decoder"
    assert "clip" not in registry.loadable_kinds() and "decoder" in registry.loadable_kinds()
    assert registry.colormap("ar_prior") == "Oranges" and registry.colormap("novel_prior") in registry.PALETTE


def test_two_classes_cannot_claim_one_kind_and_an_unknown_kind_is_named():
    from unclip.modules.prior import PriorModule

    with pytest.raises(ValueError, match="'diffusion_prior' is claimed by"):
        type("Impostor", (PriorModule,), {"kind": "diffusion_prior"})
    with pytest.raises(ValueError, match="unknown stage kind 'novel'; registered kinds: ar_prior"):
        registry.stage_class("novel")
    with pytest.raises(ValueError, match="cannot be imported"):
        registry.stage_class("novel", "nowhere_package.module.Novel")


@pytest.mark.slow
def test_a_fourth_prior_from_outside_unclip_trains_compares_and_joins_the_leaderboard(
        shapes_dir, cache_dir, stages, tmp_path, monkeypatch):  # noqa: F811
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", PYTHONPATH=f"{TESTS}{os.pathsep}{ROOT}")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *common(shapes_dir, tmp_path), "model=linear_prior", "clip=unclip_tiny",
         f"hydra.searchpath=[file://{TESTS / 'fourth_prior' / 'conf'}]", f"data.cache_dir={cache_dir}",
         "trainer.max_steps=2", "trainer.limit_val_batches=0", "run.name=fourth"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "artifacts" / "linear_prior" / "shapes.ckpt"  # published under its own kind
    assert checkpoint.exists()
    # this process never imported the new prior: unclip.load finds its class from the checkpoint
    assert "fourth_prior.module" not in sys.modules
    monkeypatch.syspath_prepend(str(TESTS))

    out = tmp_path / "compare"
    rows = run(compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, out)
                                + ["mode=compare", f"priors=[{stages['diffusion']},{checkpoint}]"]))
    assert [(r["prior"], r["settings"]) for r in rows[2:]] == [  # its settings: the eval block of its config
        ("diffusion_prior", "default"), ("linear_prior", "noise=0.0"), ("linear_prior", "noise=0.5")]
    assert all(r["cos_true"] == r["cos_true"] for r in rows)  # computed (not NaN) for every row

    out = tmp_path / "leaderboard"
    result = run(compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, out)
                                  + ["mode=leaderboard", f"priors=[{stages['diffusion']},{checkpoint}]", "grid_prompts=2",
                                     "grid_n=2", "wandb=false"]))
    table = list(csv.DictReader(open(out / "leaderboard.csv")))
    assert [(r["prior"], r["settings"]) for r in table if r["prior"] == "linear_prior"] == [
        ("linear_prior", "noise=0.0"), ("linear_prior", "noise=0.2")]
    assert [r["prior"] for r in result["image_rows"]] == ["baseline_zt", "baseline_linear", "diffusion_prior", "linear_prior"]
    assert (out / "grid_linear_prior.png").stat().st_size > 1000 and (out / "leaderboard_cost.png").exists()
