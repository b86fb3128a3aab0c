"""kill -9 at any moment, then the same command again: training resumes and repeats the uninterrupted run,
embedding finishes the same cache, and no cut-short file is ever read back as a checkpoint."""

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from test_config import ROOT
from test_scale import NO_TEXT_TOWER, TINY_PRIOR, cache_rows, tiny_prior_cfg, train_losses
from test_train_cli import common

TESTS = Path(__file__).parent
# 6 batches an epoch; a checkpoint every 2 steps; the run crosses into epoch 1
KILLABLE = ["optim.schedule=constant", "optim.warmup_steps=3", "trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=2",
            "data.mode=exact", "trainer.max_steps=8", "publish=false", "+model.callbacks.pace._target_=test_kill.Pace"]


class Pace(Callback):
    """A pause after each step, so that a killer polling for ``last.ckpt`` finds the run still going."""

    def __init__(self, seconds: float = 0.4):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


def cli_env(**extra) -> dict:
    path = os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1", PYTHONPATH=path, **extra)


def start(argv: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"the process ended (rc {process.returncode}) before {path} appeared:\n{process.stdout.read()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def kill9(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


def train(args: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


@pytest.fixture(scope="module")
def killable(shapes_dir, embed_cfg, cache_dir):
    """The command line of a tiny prior run that pauses between steps, and its uninterrupted twin's run dir."""
    root = Path(embed_cfg.paths.root)
    args = [*common(shapes_dir, root), *TINY_PRIOR, *NO_TEXT_TOWER, *KILLABLE]
    train([*args, "run.name=uninterrupted"])
    return args, root / "runs" / "shapes" / "diffusion_prior"


def assert_repeats(run: Path, whole: Path, resumed_from: int) -> None:
    """The resumed run logged every step from its checkpoint on, each with the uninterrupted run's loss, and
    ended with the same weights."""
    a, b = train_losses(whole), train_losses(run)
    assert sorted(a) == list(range(8)) and set(range(resumed_from, 8)) <= set(b)
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5), f"train/loss differs at step {step}"
    mine, theirs = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for r in (run, whole))
    assert mine["global_step"] == theirs["global_step"] == 8
    for key, value in theirs["state_dict"].items():
        torch.testing.assert_close(mine["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_training_killed_after_a_checkpoint_resumes_and_repeats_the_uninterrupted_run(killable):
    args, runs = killable
    args = [*args, "run.name=killed"]
    run = runs / "killed"
    process = start(["train.py", *args], cli_env())
    wait_for(run / "checkpoints" / "last.ckpt", process)
    kill9(process)
    resumed_from = step_of(run / "checkpoints" / "last.ckpt")
    assert 2 <= resumed_from < 8  # killed mid-run, after its first checkpoint
    rerun = train(args)
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'}" in rerun.stdout + rerun.stderr
    assert_repeats(run, runs / "uninterrupted", resumed_from)


HANG_MID_WRITE = """
import builtins, os, runpy, sys, time
from pathlib import Path

# The first binary write opened once last.ckpt exists (the second checkpoint) writes half its bytes, says
# where, and hangs, to be killed there.
marker, last = Path(sys.argv[1]), Path(sys.argv[2])
real_open = builtins.open

class Hang:
    def __init__(self, f, name):
        self.f, self.name = f, name
    def write(self, data):
        self.f.write(bytes(data)[:max(1, len(data) // 2)])
        self.f.flush()
        os.fsync(self.f.fileno())
        marker.write_text(str(self.name))
        time.sleep(3600)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

def hanging_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    if "w" in mode and "b" in mode and last.exists() and not marker.exists():
        return Hang(f, os.path.abspath(file))
    return f

builtins.open = hanging_open
sys.argv = ["train.py", *sys.argv[3:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_mid_checkpoint_write_keeps_the_last_whole_checkpoint_and_leaves_no_partial_file(killable, tmp_path):
    args, runs = killable
    args = [*args, "run.name=killed_writing"]
    run = runs / "killed_writing"
    last = run / "checkpoints" / "last.ckpt"
    marker, scratch = tmp_path / "partial", tmp_path / "tmpdir"  # the system temp dir, watched for strays
    scratch.mkdir()
    process = start(["-c", HANG_MID_WRITE, str(marker), str(last), *args], cli_env(TMPDIR=str(scratch)))
    wait_for(marker, process)
    kill9(process)
    partial = Path(marker.read_text())
    assert partial.exists() and partial != last  # the cut-short bytes are not under a checkpoint's name
    assert step_of(last) == 2  # still the first checkpoint, whole
    train(args)
    assert_repeats(run, runs / "uninterrupted", 2)
    leftovers = [p for p in scratch.iterdir() if not p.name.endswith(("wandb-artifacts", "wandb-media"))]  # wandb's own, made on import
    assert not partial.exists() and not leftovers  # the rerun cleared what the kill left
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt", "step0000008.ckpt"]


def test_checkpoint_writes_reach_the_disk_before_they_take_the_name(tmp_path, monkeypatch):
    from test_config import compose_train
    from unclip.training import build_trainer

    io = build_trainer(compose_train("model=diffusion_prior"), tmp_path / "run").strategy.checkpoint_io  # what training writes with
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.arange(4.0)}, path)
    before = path.read_bytes()
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b)))
    io.save_checkpoint({"global_step": 2, "w": torch.arange(8.0)}, path)
    assert events, "the checkpoint was not fsynced"
    temp = events[0][1]
    assert events[:2] == [("fsync", temp), ("replace", temp, str(path))]  # the bytes are durable, then renamed
    assert Path(temp).parent == path.parent  # a rename within one directory: atomic
    assert torch.load(path, weights_only=True)["global_step"] == 2

    def cut_short(obj, f, *args, **kwargs):  # a write that fails halfway (full disk, I/O error)
        f.write(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", cut_short)
    with pytest.raises(OSError, match="No space"):
        io.save_checkpoint({"global_step": 3}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2 and sorted(os.listdir(path.parent)) == ["last.ckpt"]


@pytest.mark.parametrize("strategy", ["single", "ddp_cpu"])
def test_the_trainer_writes_checkpoints_atomically_with_each_cpu_strategy(strategy, tmp_path):
    from test_config import compose_train
    from unclip.checkpoints import AtomicCheckpointIO
    from unclip.training import build_trainer

    trainer = build_trainer(compose_train("model=diffusion_prior", f"strategy={strategy}"), tmp_path)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------------ resuming a bad file


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_unreadable_last_checkpoint_falls_back_to_the_newest_readable_one(shapes_dir, embed_cfg, cache_dir, caplog):
    from unclip.training import fit

    root = Path(embed_cfg.paths.root)
    args = ["run.name=truncated", "trainer.checkpoint_every_n_steps=2", "trainer.limit_val_batches=0"]
    fit(tiny_prior_cfg(shapes_dir, root, *args, "trainer.max_steps=3"))
    folder = root / "runs" / "shapes" / "diffusion_prior" / "truncated" / "checkpoints"
    assert step_of(folder / "last.ckpt") == 3 and step_of(folder / "step0000002.ckpt") == 2
    truncate(folder / "last.ckpt")  # as a kill mid-write by an older version, or a disk error, leaves it
    with caplog.at_level(logging.WARNING, logger="unclip"):
        fit(tiny_prior_cfg(shapes_dir, root, *args, "trainer.max_steps=5"))
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"{folder / 'last.ckpt'} is unreadable" in message and f"resuming from {folder / 'step0000002.ckpt'} (step 2)" in message
    assert step_of(folder / "last.ckpt") == 5  # trained on from step 2 and wrote a whole last.ckpt again


def test_an_unreadable_last_checkpoint_and_nothing_else_starts_afresh(shapes_dir, embed_cfg, cache_dir, caplog):
    from unclip.training import fit

    root = Path(embed_cfg.paths.root)
    args = ["run.name=truncated_alone", "trainer.limit_val_batches=0"]
    fit(tiny_prior_cfg(shapes_dir, root, *args, "trainer.max_steps=1"))
    folder = root / "runs" / "shapes" / "diffusion_prior" / "truncated_alone" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    truncate(folder / "last.ckpt")
    with caplog.at_level(logging.WARNING, logger="unclip"):
        fit(tiny_prior_cfg(shapes_dir, root, *args, "trainer.max_steps=2"))
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"{folder / 'last.ckpt'} is unreadable" in message and "starting afresh" in message
    assert step_of(folder / "last.ckpt") == 2


def test_an_unreadable_ckpt_path_is_named(shapes_dir, embed_cfg, cache_dir, tmp_path):
    from unclip.loading import CheckpointError
    from unclip.training import fit

    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00" * 100)
    root = Path(embed_cfg.paths.root)
    with pytest.raises(CheckpointError, match=re.escape(f"ckpt_path={bad} is not a readable unclip checkpoint")):
        fit(tiny_prior_cfg(shapes_dir, root, "run.name=bad_ckpt_path", f"ckpt_path={bad}", "trainer.max_steps=1"))


# ----------------------------------------------------------------------------------- embedding


EMBED_HANGING = """
import os, runpy, sys, time
from pathlib import Path
import webdataset as wds

# once the first shard is in the cache, the next shard's writer hangs after its first chunk, to be killed there
first, marker = Path(sys.argv[1]), Path(sys.argv[2])
write = wds.TarWriter.write
def hanging_write(self, obj):
    out = write(self, obj)
    if first.exists() and not marker.exists():
        getattr(getattr(self.tarstream.fileobj, "fileobj", None), "flush", lambda: None)()
        marker.write_text("mid-shard")
        time.sleep(3600)
    return out
wds.TarWriter.write = hanging_write
sys.argv = ["embed.py", *sys.argv[3:]]
runpy.run_path("embed.py", run_name="__main__")
"""


def embed_overrides(shapes_dir, cache: Path) -> list[str]:
    return [f"data.train={shapes_dir}/train-*.tar", f"data.val={shapes_dir}/val-*.tar", f"data.val_unseen={shapes_dir}/val_unseen-*.tar",
            f"data.cache_dir={cache}", f"paths.root={cache.parent}", "clip=unclip_tiny", "batch_size=32", "chunk_size=10", "progress=false"]


@pytest.mark.slow
def test_embedding_killed_mid_shard_reruns_to_the_uninterrupted_cache(shapes_dir, cache_dir, tmp_path):
    # another process than the one that made the session's cache: the random CLIP is the same from its seed
    from unclip.data.cache import read_meta

    cache, marker = tmp_path / "cache", tmp_path / "marker"
    process = start(["-c", EMBED_HANGING, str(cache / "train-00000.tar"), str(marker), *embed_overrides(shapes_dir, cache)], cli_env())
    wait_for(marker, process)
    kill9(process)
    assert list(read_meta(cache)["counts"]) == ["train-00000.tar"]
    assert (cache / "train-00001.tar.tmp").exists()  # the shard being written when killed...
    assert sorted(p.name for p in cache.glob("*.tar")) == ["train-00000.tar"]  # ...is under no shard's name
    rerun = subprocess.run([sys.executable, "embed.py", *embed_overrides(shapes_dir, cache)], cwd=ROOT, env=cli_env(),
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_meta(cache)["counts"] == read_meta(cache_dir)["counts"]
    for split in ("train", "val", "val_unseen"):
        mine, theirs = cache_rows(cache, split), cache_rows(cache_dir, split)
        assert mine["keys"] == theirs["keys"]
        for field in ("img_emb", "txt_emb"):
            assert (mine[field] == theirs[field]).all(), f"{split} {field} differs from the uninterrupted cache"
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".tar")) == ["meta.json", "stats.npz"]
