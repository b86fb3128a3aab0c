"""Scale-out on tiny shards: DDP over two gloo processes, the submitit launcher, an exact mid-epoch resume,
the resume config check, bf16 + accumulation + clipping, the compile and FSDP configs, and a multirun
over both priors logging the same metric keys."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from helpers import logged_keys
from test_config import compose_train, run_cli
from test_train_cli import common

TINY_PRIOR = ["model=diffusion_prior", "clip=unclip_tiny", "model.module.net.dim=32", "model.module.net.depth=1",
              "model.module.net.heads=2", "model.module.val_pool=24", "sampler.steps=4", "diffusion.num_timesteps=50"]
# conditioned on z_t only: no CLIP text tower to run (most of a tiny step), for tests about the training loop
NO_TEXT_TOWER = ["model.module.use_token_states=false", "model.needs_clip=false"]


class BatchRecorder(Callback):
    """Appends, per rank, what each train batch was: its keys, this rank's own (unsynchronised) loss and the
    seed torch's generator was given for it. Used through ``+model.callbacks.record._target_=test_scale.BatchRecorder``."""

    def __init__(self, out: str):
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        with open(Path(self.out) / f"rank{trainer.global_rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "batch": batch_idx, "keys": batch["key"],
                                "loss": float(outputs["loss"]), "seed": torch.initial_seed()}) + "\n")


def recorded(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"rank{rank}.jsonl").read_text().splitlines()]


def train_losses(run: Path) -> dict[int, float]:
    """step -> train/loss over every CSV version of a run dir (a resumed run writes a new version)."""
    losses = {}
    for path in sorted(run.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(open(path)):
            if row.get("train/loss"):
                losses[int(row["step"])] = float(row["train/loss"])
    return losses


def cache_rows(cache_dir, split: str) -> dict:
    from unclip.data.cache import read_cache_shard

    shards = sorted(Path(cache_dir).glob(f"{split}-*.tar"))
    parts = [read_cache_shard(str(s), ("img_emb", "txt_emb")) for s in shards]
    return {"keys": [k for p in parts for k in p["keys"]],
            **{f: np.concatenate([p[f] for p in parts]).astype(np.float32) for f in ("img_emb", "txt_emb")}}


# ----------------------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_on_cpu_trains_two_ranks_on_disjoint_halves_with_a_synchronised_loss(shapes_dir, embed_cfg, cache_dir, tmp_path,
                                                                                 monkeypatch):
    root = Path(embed_cfg.paths.root)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    result = run_cli(*common(shapes_dir, root), *TINY_PRIOR, *NO_TEXT_TOWER, "strategy=ddp_cpu", "run.name=ddp", "data.mode=exact",
                     "trainer.max_epochs=1", "trainer.max_steps=-1", "trainer.val_check_interval=3", "publish=false",
                     "+model.callbacks.record._target_=test_scale.BatchRecorder", f"+model.callbacks.record.out={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [recorded(tmp_path, 0), recorded(tmp_path, 1)]
    # 96 train samples, 4 shards, 2 ranks, batch 16: each rank trains 3 batches of its own 2 shards
    assert [len(r) for r in ranks] == [3, 3]
    keys = [[k for batch in r for k in batch["keys"]] for r in ranks]
    assert not set(keys[0]) & set(keys[1])
    train = cache_rows(cache_dir, "train")["keys"]
    assert sorted(keys[0] + keys[1]) == sorted(train)  # each sample once in the epoch, across ranks
    run = root / "runs" / "shapes" / "diffusion_prior" / "ddp"
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 3 and state["CaptionImageDataModule"] == {"epoch": 0, "batches": 3, "epoch_done": True}
    # train/loss is the mean over the ranks, not rank 0's own loss
    logged = train_losses(run)
    assert sorted(logged) == [0, 1, 2]
    for step, (a, b) in enumerate(zip(*ranks)):
        assert a["loss"] != b["loss"] and logged[step] == pytest.approx((a["loss"] + b["loss"]) / 2, rel=1e-5)
    assert a["seed"] != b["seed"]  # per-rank noise
    # validation: one val shard is split by rows over the two ranks, and the pools are joined, so the data
    # baseline cos(z_t, z_i) is that of all 24 val pairs (rank 0 alone holds 12)
    val = cache_rows(cache_dir, "val")
    unit = {f: val[f] / np.linalg.norm(val[f], axis=1, keepdims=True) for f in ("img_emb", "txt_emb")}
    expected = float((unit["img_emb"] * unit["txt_emb"]).sum(1).mean())
    metrics = {k: float(v) for path in run.glob("csv/version_*/metrics.csv") for row in csv.DictReader(open(path))
               for k, v in row.items() if v and k.startswith("val/")}
    assert metrics["val/prior/baseline_cos"] == pytest.approx(expected, abs=1e-5)
    # the distribution metric too is that of the joined pool, counted once (not re-gathered per rank)
    from unclip.eval.image_metrics import frechet_distance

    joined_fd = frechet_distance(torch.as_tensor(unit["img_emb"]), torch.as_tensor(unit["txt_emb"]))
    assert metrics["val/baseline_zt/fd_img"] == pytest.approx(joined_fd, rel=1e-4)
    assert {"val/loss", "val/prior/cos_true_unseen", "val/baseline_linear/retrieval_top1"} <= set(metrics)


def test_datamodule_state_skips_consumed_batches_and_splits_a_lone_shard_by_rows(shapes_dir, cache_dir):
    from unclip.data.datamodule import CaptionImageDataModule

    def datamodule(fields=("img_emb", "txt_emb", "caption")):
        dm = CaptionImageDataModule(train=f"{shapes_dir}/train-*.tar", val=f"{shapes_dir}/val-*.tar", fields=list(fields),
                                    cache_dir=cache_dir, batch_size=16, num_workers=0, image_size=16)
        dm.setup()
        return dm

    def epoch_keys(dm, epoch):
        dm.set_epoch(epoch)
        return [batch["key"] for batch in dm.train_dataloader()]

    reference = datamodule()
    epochs = [epoch_keys(reference, 0), epoch_keys(reference, 1)]
    assert len(epochs[0]) == 6 and epochs[0] != epochs[1]
    resumed = datamodule()
    resumed.load_state_dict({"epoch": 0, "batches": 4, "epoch_done": False})
    assert [b["key"] for b in resumed.train_dataloader()] == epochs[0][4:]
    finished = datamodule()
    finished.load_state_dict({"epoch": 0, "batches": 6, "epoch_done": True})  # resumes at the next epoch's start
    assert [b["key"] for b in finished.train_dataloader()] == epochs[1]
    # one val shard, two ranks: each reads it and keeps alternate rows, for embeddings and images alike
    for fields in (("img_emb", "txt_emb"), ("image", "caption")):
        halves = []
        for rank in (0, 1):
            dm = datamodule(fields)
            dm.datasets["val"].set_rank(rank, 2)
            halves.append([k for batch in dm.val_dataloader() for k in batch["key"]])
        assert len(halves[0]) == len(halves[1]) == 12 and not set(halves[0]) & set(halves[1])


# ------------------------------------------------------------------------- submitit and multirun


@pytest.fixture(scope="module")
def local_multirun(shapes_dir, embed_cfg, cache_dir):
    """One ``-m`` run through submitit's local executor over both priors, logging to wandb offline."""
    root = Path(embed_cfg.paths.root)
    # ++: Hydra applies the overrides to the primary config (model=clip_pretrain) before sweeping over models
    result = run_cli("-m", "launcher=local", "hydra.launcher.timeout_min=10", *common(shapes_dir, root),
                     "model=diffusion_prior,ar_prior", "clip=unclip_tiny", "++model.module.net.dim=32", "++model.module.net.depth=1",
                     "++model.module.net.heads=2", "++model.module.val_pool=24", "experiment.name=multirun", "logger=wandb",
                     "logger.offline=true", "trainer.max_steps=2", "publish=false", "run.name=local", timeout=600)
    return result, root / "runs" / "multirun"


@pytest.mark.slow
def test_submitit_local_launch_runs_each_job_to_a_checkpoint(local_multirun):
    result, sweep = local_multirun
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert list(sweep.glob(".submitit/*/*_result.pkl"))  # the jobs went through submitit, not the basic launcher
    for model in ("diffusion_prior", "ar_prior"):
        run = sweep / model / "local"
        state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == 2 and (run / "config.yaml").exists()


def wandb_records(path: Path):
    """The records of an offline wandb run file (``run-*.wandb``: the LevelDB log format, 32 KiB blocks of
    7-byte-framed chunks after a 7-byte ``:W&B`` header); wandb itself no longer ships a Python reader."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run(run: Path) -> tuple[set[str], object]:
    """(metric keys logged, the run record: group, job type, tags) of the offline wandb run under a run dir."""
    files = list(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline wandb run under {run}, found {files}"
    keys, info = set(), None
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
        elif kind == "run":
            info = record.run
    return keys, info


@pytest.mark.slow
def test_multirun_over_both_priors_logs_the_same_prior_metric_keys(local_multirun):
    result, sweep = local_multirun
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    runs = {model: wandb_run(sweep / model / "local") for model in ("diffusion_prior", "ar_prior")}
    prior = {model: {k for k in keys if k.startswith("val/prior/")} for model, (keys, _) in runs.items()}
    assert prior["diffusion_prior"] == prior["ar_prior"]
    assert {"val/prior/cos_true", "val/prior/retrieval_top1", "val/prior/cos_true_unseen"} <= prior["ar_prior"]
    for model, (keys, info) in runs.items():
        # one wandb panel compares them: same group (the experiment), the model as job type and tag
        assert "train/loss" in keys and info.run_group == "multirun" and info.job_type == model and model in info.tags


# ---------------------------------------------------------------------------------------- resume


def tiny_prior_cfg(shapes_dir, root, *overrides):
    return compose_train(*common(shapes_dir, root), *TINY_PRIOR, *NO_TEXT_TOWER, "publish=false", *overrides)


@pytest.mark.slow
def test_resume_mid_epoch_repeats_the_uninterrupted_run(shapes_dir, embed_cfg, cache_dir, tmp_path):
    from unclip.training import fit

    root = Path(embed_cfg.paths.root)
    # constant LR after a warmup longer than the break: the LR schedule must continue, and the run length
    # (which the cosine decay would stretch to) is the only thing that changes between the two commands
    args = ["optim.schedule=constant", "optim.warmup_steps=5", "trainer.val_check_interval=4",
            "trainer.checkpoint_every_n_steps=2", "data.mode=exact"]
    fit(tiny_prior_cfg(shapes_dir, root, *args, "run.name=whole", "trainer.max_steps=8"))
    # 6 batches an epoch: step 3 is mid-epoch, and the resumed run crosses into epoch 1
    fit(tiny_prior_cfg(shapes_dir, root, *args, "run.name=split", "trainer.max_steps=3"))
    runs = root / "runs" / "shapes" / "diffusion_prior"
    paused = torch.load(runs / "split" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert paused["global_step"] == 3 and paused["CaptionImageDataModule"] == {"epoch": 0, "batches": 3, "epoch_done": False}
    fit(tiny_prior_cfg(shapes_dir, root, *args, "run.name=split", "trainer.max_steps=8"))

    whole, split = train_losses(runs / "whole"), train_losses(runs / "split")
    assert sorted(whole) == sorted(split) == list(range(8))
    for step in range(8):
        assert split[step] == pytest.approx(whole[step], rel=1e-5), f"train/loss differs at step {step}"
    assert len(set(whole.values())) == 8  # the comparison is not trivially between constants
    a, b = (torch.load(runs / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True) for name in ("whole", "split"))
    assert a["global_step"] == b["global_step"] == 8
    assert a["CaptionImageDataModule"] == b["CaptionImageDataModule"] == {"epoch": 1, "batches": 2, "epoch_done": False}
    for name in ("state_dict", "current_model_state"):  # EMA and raw weights
        for key, value in a[name].items():
            torch.testing.assert_close(b[name][key], value, rtol=1e-5, atol=1e-6, msg=f"{name}[{key}]")
    ema = [next(v for k, v in ckpt["callbacks"].items() if "NetEMA" in k) for ckpt in (a, b)]
    assert ema[0] == ema[1] and ema[0]["n_averaged"] == 8
    opt = [ckpt["optimizer_states"][0]["state"] for ckpt in (a, b)]
    for index, state in opt[0].items():
        torch.testing.assert_close(opt[1][index]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-5, atol=1e-10)
        assert float(opt[1][index]["step"]) == float(state["step"]) == 8
    assert a["lr_schedulers"][0]["last_epoch"] == b["lr_schedulers"][0]["last_epoch"] == 8


def test_resume_refuses_another_config_and_names_the_keys(shapes_dir, embed_cfg, cache_dir):
    from unclip.training import fit

    root = Path(embed_cfg.paths.root)
    base = ["run.name=guarded", "trainer.limit_val_batches=0"]
    fit(tiny_prior_cfg(shapes_dir, root, *base, "trainer.max_steps=1"))
    run = root / "runs" / "shapes" / "diffusion_prior" / "guarded"
    stored = (run / "config.yaml").read_text()
    assert "${" not in stored and "max_steps: 1" in stored  # resolved
    with pytest.raises(ValueError) as error:
        fit(tiny_prior_cfg(shapes_dir, root, *base, "trainer.max_steps=2", "model.module.net.depth=2", "seed=1"))
    message = str(error.value)
    assert "model.module.net.depth: 1 -> 2" in message and "seed: 0 -> 1" in message and str(run) in message
    assert "max_steps" not in message.split("Only")[0]  # run length may change and is not reported
    # run length, logger and workers may change: this resumes
    fit(tiny_prior_cfg(shapes_dir, root, *base, "trainer.max_steps=2", "logger.name=csv_resumed", "data.num_workers=1"))
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and "max_steps: 2" in (run / "config.yaml").read_text()


# -------------------------------------------------------------- precision, accumulation, compile, FSDP


def test_bf16_with_accumulation_and_clipping_trains_with_distinct_noise_per_micro_batch(shapes_dir, embed_cfg, cache_dir, tmp_path):
    from unclip.training import fit

    root = Path(embed_cfg.paths.root)
    fit(tiny_prior_cfg(shapes_dir, root, "run.name=bf16", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2",
                       "trainer.gradient_clip_val=0.5", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                       "+model.callbacks.record._target_=test_scale.BatchRecorder", f"+model.callbacks.record.out={tmp_path}"))
    run = root / "runs" / "shapes" / "diffusion_prior" / "bf16"
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    batches = recorded(tmp_path, 0)
    assert [b["step"] for b in batches] == [0, 1, 1, 2]  # two batches per optimiser step
    assert len({b["seed"] for b in batches}) == 4  # micro-batches of one step draw different noise
    assert all(np.isfinite(b["loss"]) for b in batches)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.parametrize("tiny", [["model=diffusion_prior", "model.module.net.dim=32", "model.module.net.depth=1"],
                                  ["model=decoder", "model.module.net.channels=16", "model.module.net.channel_mult=[1]",
                                   "model.module.net.attention_resolutions=[]", "model.module.net.groups=8"],
                                  ["model=upsampler_32_64"]])
def test_compile_knob_compiles_the_net_in_place(tiny_clip, tiny):
    from unclip.training import build_module

    plain = build_module(compose_train(*tiny), tiny_clip)
    compiled = build_module(compose_train(*tiny, "model.compile=true"), tiny_clip)
    assert plain.net._compiled_call_impl is None and compiled.net._compiled_call_impl is not None
    assert list(compiled.state_dict()) == list(plain.state_dict())  # checkpoints keep their names


def test_fsdp_wraps_the_blocks_of_priors_and_unets():
    from lightning.pytorch.strategies import FSDPStrategy

    from unclip.nets.layers import Block
    from unclip.nets.prior_transformer import PriorTransformer
    from unclip.nets.unet import AttentionBlock, ResBlock, UNet
    from unclip.training import build_strategy

    strategy = build_strategy(compose_train("strategy=fsdp"))
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert {Block, ResBlock, AttentionBlock} <= set(policy._module_classes)
    prior = PriorTransformer({"embed_dim": 16, "text_width": 0, "dim": 32, "depth": 2, "heads": 2})
    unet = UNet({"image_size": 8, "channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_resolutions": [4],
                 "head_channels": 32, "embed_dim": 16})
    for net, kinds in ((prior, {Block}), (unet, {ResBlock, AttentionBlock})):
        wrapped = policy._run_policy(net, set(), {})  # the FSDP units the policy makes of this net
        assert kinds <= {type(m) for m in wrapped} and sum(isinstance(m, tuple(kinds)) for m in wrapped) >= 2


def test_fsdp_clips_gradients_through_the_sharded_root_and_others_through_lightning(tiny_clip):
    # Lightning's FSDP precision plugin refuses gradient_clip_algorithm="norm" (trainer.gradient_clip_val
    # defaults to 1.0): under FSDP the wrapped root computes the norm over every shard
    from types import SimpleNamespace

    from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy

    from unclip.training import build_module

    tiny = ["model=diffusion_prior", "model.module.net.dim=32", "model.module.net.depth=1"]
    module = build_module(compose_train(*tiny), tiny_clip)
    clipped, plain = [], []
    root = SimpleNamespace(clip_grad_norm_=clipped.append)
    module._trainer = SimpleNamespace(strategy=FSDPStrategy.__new__(FSDPStrategy), model=root)
    module.clip_gradients = lambda optimizer, value, algorithm: plain.append((value, algorithm))
    module.configure_gradient_clipping(None, 1.0, "norm")
    assert clipped == [1.0] and plain == []
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy.__new__(SingleDeviceStrategy), model=root)
    module.configure_gradient_clipping(None, 0.5, "norm")
    assert clipped == [1.0] and plain == [(0.5, "norm")]
    # a fused optimizer without a GradScaler (fp32, bf16): Lightning would refuse, the module clips itself
    weight = torch.nn.Parameter(torch.zeros(4))
    weight.grad = torch.full((4,), 3.0)
    fused = torch.optim.AdamW([weight], fused=True)
    module._trainer = SimpleNamespace(strategy=SingleDeviceStrategy.__new__(SingleDeviceStrategy), model=root,
                                      precision_plugin=SimpleNamespace(scaler=None))
    module.configure_gradient_clipping(fused, 0.5, "norm")
    assert plain == [(0.5, "norm")] and torch.allclose(weight.grad.norm(), torch.tensor(0.5))
