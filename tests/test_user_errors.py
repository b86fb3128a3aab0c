"""A user's mistake on the command line is one ``error: ...`` line and exit status 2; a bug keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from unclip.cli import EXIT_USER_ERROR, UserError, user_errors

ROOT = Path(__file__).resolve().parents[1]


def run_main(script, *args, full_error="0", tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR=full_error)
    return subprocess.run([sys.executable, str(ROOT / script), f"paths.root={tmp_path}", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_a_shard_pattern_that_matches_nothing_is_one_line_and_status_2(tmp_path):
    result = run_main("train.py", "data.train=/nonexistent/x-*.tar", "trainer.max_steps=1", tmp_path=tmp_path)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-2000:]
    assert "error: shard pattern '/nonexistent/x-*.tar' matches no file" in result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr


def test_empty_prompts_is_one_line_and_full_error_shows_the_traceback(tmp_path):
    short = run_main("sample.py", "prompts=[]", tmp_path=tmp_path)
    assert short.returncode == EXIT_USER_ERROR, short.stderr[-2000:]
    # the missing stages (nothing published under this paths.root) are reported in the same message
    assert "error: 3 problems with the arguments:" in short.stderr and "Traceback" not in short.stderr
    assert "prompts=[]: mode=generate needs at least one prompt" in short.stderr and "prior=diffusion: no checkpoint" in short.stderr
    full = run_main("sample.py", "prompts=[]", full_error="1", tmp_path=tmp_path)
    assert full.returncode == 1 and "Traceback" in full.stderr and "needs at least one prompt" in full.stderr


def test_user_errors_exit_2_and_bugs_propagate(monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")

    def raising(exn):
        @user_errors
        def main():
            raise exn
        return main

    for exn in (UserError("n=-1: must be >= 1"), FileNotFoundError("no checkpoint 'x'"), ValueError("bad")):
        with pytest.raises(SystemExit) as exit_:
            raising(exn)()
        assert exit_.value.code == EXIT_USER_ERROR
        assert capsys.readouterr().err == f"error: {exn}\n"
    for bug in (RuntimeError("shape mismatch"), TypeError("x"), AssertionError("y")):
        with pytest.raises(type(bug)):
            raising(bug)()
    from hydra.errors import InstantiationException

    wrapped = InstantiationException("Error in call to target 'unclip.clip.FrozenCLIP'")
    wrapped.__cause__ = FileNotFoundError("CLIP weights /x/shapes.pt not found")
    with pytest.raises(SystemExit):  # what hydra.utils.instantiate raised for a missing file: the file is named
        raising(wrapped)()
    assert capsys.readouterr().err == "error: CLIP weights /x/shapes.pt not found\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError):
        raising(UserError("n=-1"))()


# ------------------------------------------------------------------ sample.py checks before it loads anything


@pytest.fixture
def no_loading(monkeypatch):
    from unclip.pipeline import UnCLIPPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("sample() loaded a stage before checking its arguments")
    monkeypatch.setattr(UnCLIPPipeline, "from_checkpoints", classmethod(refuse))
    monkeypatch.setattr(UnCLIPPipeline, "from_pretrained", classmethod(refuse))


def sample_with(tmp_path, *overrides, decoder=True):
    from hydra import compose, initialize_config_dir

    from unclip.sampling import sample

    (tmp_path / "decoder.ckpt").touch()  # resolve() only asks that it exists; nothing is loaded
    stages = [f"decoder={tmp_path / 'decoder.ckpt'}"] if decoder else ["decoder=decoder/missing"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"paths.root={tmp_path}", f"paths.artifacts={tmp_path}/artifacts",
                                           f"prior={tmp_path / 'decoder.ckpt'}", "progress=false", *stages, *overrides])
    with pytest.raises(UserError) as raised:
        sample(cfg)
    return str(raised.value)


@pytest.mark.parametrize("n", [-1, 0])
def test_a_bad_n_is_named_before_any_stage_loads(no_loading, tmp_path, n):
    assert sample_with(tmp_path, f"n={n}") == f"n={n}: samples per prompt must be an integer >= 1"


@pytest.mark.parametrize("decoder", [True, False])
def test_a_missing_prior_is_named_as_the_prior_and_a_missing_decoder_beside_it(no_loading, tmp_path, decoder):
    message = sample_with(tmp_path, "prior=missing", decoder=decoder)
    assert "prior=missing: no checkpoint 'missing'" in message
    assert ("decoder=decoder/missing: no checkpoint" in message) == (not decoder)
    assert message.startswith("2 problems") == (not decoder)


def test_a_nan_guidance_and_k_1_are_refused_together(no_loading, tmp_path):
    assert sample_with(tmp_path, "prior_guidance=nan") == (
        "prior_guidance=nan: a guidance scale must be a finite number (or null: the stage's default)")
    image = tmp_path / "a.png"
    image.touch()
    message = sample_with(tmp_path, "mode=interpolate", f"images=[{image},{image}]", "k=1", "decoder_steps=0")
    assert message.startswith("2 problems") and "k=1: mode=interpolate needs an integer k >= 2" in message
    assert "decoder_steps=0: sampling steps must be an integer >= 1" in message
    assert sample_with(tmp_path, "precision=bf16") == "precision=bf16: must be one of auto | 32-true | bf16-mixed"


@pytest.mark.parametrize("net", ["unet", "prior"])
def test_a_net_config_key_no_net_has_is_named(net):
    """A typo in a net's config, or a checkpoint written by another version of unclip, names the keys the net
    lacks instead of failing with the dataclass's bare TypeError."""
    from unclip.nets.prior_transformer import PriorTransformer
    from unclip.nets.unet import UNet

    build, config = {"unet": (UNet, {"image_size": 16, "channels": 16, "channel_mult": [1, 2], "groups": 8}),
                     "prior": (PriorTransformer, {"dim": 32, "depth": 1, "heads": 2})}[net]
    build(config)
    with pytest.raises(ValueError, match=r"has no 'text_layers', 'widht' \(its keys: .*\); a checkpoint holding such keys"):
        build({**config, "widht": 3, "text_layers": 2})


def test_an_unknown_splitter_or_completer_is_named_before_any_stage_loads(no_loading, tmp_path):
    message = sample_with(tmp_path, "compose=by_commas", "complete=everything")
    assert message.startswith("2 problems")
    assert "compose=by_commas: must be one of split_and | object_phrases | whole_and_object_phrases" in message
    assert "complete=everything: must be one of shapes (or null: off)" in message
