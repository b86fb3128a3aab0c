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
    assert "error: mode=generate needs prompts=" in short.stderr and "Traceback" not in short.stderr
    full = run_main("sample.py", "prompts=[]", full_error="1", tmp_path=tmp_path)
    assert full.returncode == 1 and "Traceback" in full.stderr and "needs prompts=" in full.stderr


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
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(UserError):
        raising(UserError("n=-1"))()
