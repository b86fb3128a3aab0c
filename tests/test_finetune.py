"""Fine-tuning from a stage: ``train.py init_from=`` for a converted published prior, the decoder and the
upsampler (resume keeps the run's own weights, shape mismatches are named), and ``finetune=lora`` through
peft on the prior and the decoder (only the adapter trains and is saved, it loads on its base and only
there, it merges into a plain stage that samples identically)."""

import sys
from pathlib import Path

import pytest
import torch

from test_convert import published  # noqa: F401  (a fixture: a tiny random karlo prior, converted)
from test_leaderboard import compose_evaluate, stages, tiny_overrides  # noqa: F401  (stages: a fixture)
from unclip import training
from unclip.eval.run import run as evaluate
from unclip.loading import load, read_stage
from unclip.lora import BaseMismatchError, merge_file, state_sha256
from unclip.lora import main as lora_main

pytest.importorskip("peft")
CONF = Path(__file__).resolve().parents[1] / "conf"
FAST = ["data.num_workers=0", "data.batch_size=8", "data.val_batch_size=24", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "optim.warmup_steps=1", "optim.optimizer.lr=1e-2", "logger=csv"]
PRIOR = ["model=published_prior", "clip=unclip_tiny", "trainer.limit_val_batches=0", "model.module.val_pool=8"]
# the decoder at the size of the tiny stages (16 px, 16 channels): data images are resized to it
DECODER = ["model=decoder", "clip=unclip_tiny", "model.image_size=16", "model.module.net.patch_size=1",
           "model.module.net.channels=16", "model.module.net.channel_mult=[1,2]", "model.module.net.attention_resolutions=[8]",
           "model.module.net.head_channels=16", "model.module.net.groups=8", "diffusion.num_timesteps=50",
           "trainer.limit_val_batches=0", "model.module.attribute_classifier=null"]
UPSAMPLER = ["model=upsampler_32_64", "model.image_size=32", "model.lowres_size=16", "model.module.crop_size=16",
             "model.module.net.channels=8", "model.module.net.channel_mult=[1,2]", "model.module.net.groups=8",
             "diffusion.num_timesteps=50", "model.module.noise_aug.max_step=20", "trainer.limit_val_batches=0"]


def compose_train(root: Path, shapes_dir: Path, cache_dir, *overrides):
    from hydra import compose, initialize_config_dir

    data = [f"data.train={shapes_dir}/train-*.tar", f"data.val={shapes_dir}/val-*.tar",
            f"data.val_unseen={shapes_dir}/val_unseen-*.tar"] + ([f"data.cache_dir={cache_dir}"] if cache_dir else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"paths.root={root}", *data, *FAST, *overrides])


def fit(root, shapes_dir, cache_dir, *overrides):
    """``train.py``'s fit in this process (the run dir is paths.runs/EXPERIMENT/MODEL/run.name)."""
    cfg = compose_train(root, shapes_dir, cache_dir, *overrides)
    training.fit(cfg)
    return Path(cfg.paths.runs) / cfg.experiment.name / cfg.model.name / cfg.run.name


def count_calls(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(a) or original(*a, **k))
    return calls


def last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def sample(module, clip, seed=0):
    captions = ["a red circle", "two blue squares"]
    cond = module.condition({"txt_emb": clip.encode_text(captions).z_txt, "caption": captions})
    return module.sample(cond, torch.Generator().manual_seed(seed), steps="linspace4")


# ------------------------------------------------------------------------------------ the published prior
def test_lora_on_a_converted_prior_trains_resumes_loads_on_its_base_merges_and_joins_compare(
        published, shapes_dir, cache_dir, stages, tiny_clip, tmp_path, monkeypatch):  # noqa: F811
    base_path = published["stage"]
    args = [*PRIOR, f"init_from={base_path}", "finetune=lora", "finetune.rank=2", "run.name=lora"]
    run = fit(tmp_path, shapes_dir, cache_dir, *args, "trainer.max_steps=2")
    first = last(run)
    base = read_stage(base_path)["state_dict"]
    adapter = set(first["state_dict"])
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)  # the checkpoint holds the adapter alone
    assert set(first["current_model_state"]) == adapter and first["global_step"] == 2
    lora = first["hyper_parameters"]["lora"]
    assert lora["rank"] == 2 and lora["base"]["kind"] == "published_prior" and lora["base"]["sha256"] == state_sha256(base)
    assert any("transformer_blocks.0.attn1.to_q" in k for k in adapter) and any("ff.net.2" in k for k in adapter)

    # resume: the step count continues from the adapter, the base loaded again under it
    calls = count_calls(monkeypatch, training, "init_weights")
    run = fit(tmp_path, shapes_dir, cache_dir, *args, "trainer.max_steps=3")
    second = last(run)
    assert second["global_step"] == 3 and len(calls) == 1
    assert any(not torch.equal(first["current_model_state"][k], second["current_model_state"][k]) for k in adapter)

    # unclip.load: the base's weights where they were, only the adapter moved; lora_B started at zero
    tuned_path = tmp_path / "artifacts" / "published_prior" / "shapes.ckpt"
    tuned = load(tuned_path, clip=tiny_clip)
    state = tuned.state_dict()
    for name, tensor in base.items():
        layer, _, leaf = name.rpartition(".")
        key = name if name in state else f"{layer}.base_layer.{leaf}"
        assert torch.equal(state[key], tensor), name
    assert any(state[k].abs().sum() > 0 for k in adapter if ".lora_B." in k)
    assert not torch.allclose(sample(tuned, tiny_clip), sample(load(base_path, clip=tiny_clip), tiny_clip), atol=1e-4)

    # another base under the recorded path's name is refused by its weights
    with pytest.raises(BaseMismatchError, match="was trained on the published_prior stage .* holds other weights"):
        load(tuned_path, clip=tiny_clip, base=stages["diffusion"])

    # merge: a plain stage that opens without peft and samples as the adapter on its base
    plain = merge_file(tuned_path, tmp_path / "plain.ckpt")
    merged = read_stage(plain)
    assert "lora" not in merged["hyper_parameters"] and set(merged["state_dict"]) == set(base)
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft now fails
    difference = (sample(load(plain, clip=tiny_clip), tiny_clip) - sample(tuned, tiny_clip)).abs().max()
    print(f"max |merged - adapter on base| over a 4-step guided sample: {difference:.2e}")
    assert difference <= 1e-5
    monkeypatch.delitem(sys.modules, "peft")

    # the adapter is ranked beside a native prior
    out = tmp_path / "compare"
    rows = evaluate(compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, out)
                                     + ["mode=compare", f"priors=[{stages['diffusion']},{tuned_path}]"]))
    ours = [r for r in rows if r["prior"] == "published_prior"]
    assert ours and all(r["cos_true"] == r["cos_true"] for r in ours)  # computed, not NaN


# ------------------------------------------------------------------------------------------ the decoder
@pytest.fixture(scope="module")
def decoder_stage(shapes_dir, cache_dir, tmp_path_factory):
    """A tiny decoder trained one step with train.py and published (paths.artifacts/decoder/base.ckpt)."""
    root = tmp_path_factory.mktemp("decoder_base")
    fit(root, shapes_dir, cache_dir, *DECODER, "experiment.name=base", "run.name=base", "trainer.max_steps=1")
    return root / "artifacts" / "decoder" / "base.ckpt"


def test_decoder_init_from_a_trained_stage_starts_there_resumes_on_its_own_and_refuses_another_shape(
        decoder_stage, shapes_dir, cache_dir, tmp_path, monkeypatch):
    base = read_stage(decoder_stage)["state_dict"]
    # at lr 0 the run's weights, EMA and published stage are the stage it started from, exactly
    fit(tmp_path, shapes_dir, cache_dir, *DECODER, f"init_from={decoder_stage}", "optim.optimizer.lr=0", "run.name=still",
        "experiment.name=still", "trainer.max_steps=1")
    still = read_stage(tmp_path / "artifacts" / "decoder" / "still.ckpt")["state_dict"]
    assert set(still) == set(base) and all(torch.equal(still[k], base[k]) for k in base)

    args = [*DECODER, f"init_from={decoder_stage}", "run.name=full"]
    run = fit(tmp_path, shapes_dir, cache_dir, *args, "trainer.max_steps=1")
    calls = count_calls(monkeypatch, training, "init_weights")
    fit(tmp_path, shapes_dir, cache_dir, *args, "trainer.max_steps=2")
    resumed = last(run)
    assert resumed["global_step"] == 2 and not calls  # the resumed run kept its own weights
    ema = next(v for k, v in resumed["callbacks"].items() if "NetEMA" in k)
    assert ema["n_averaged"] == 2

    with pytest.raises(ValueError, match=r"does not fit this run's decoder: missing none; unexpected none; shapes "
                                         r"\(stage vs run\) net\.context_norm\.bias \(32,\) vs \(64,\), .* in all\)\. Make model.module.net match"):
        fit(tmp_path, shapes_dir, cache_dir, *args, "model.module.net.channels=32", "run.name=wide", "trainer.max_steps=1")
    with pytest.raises(ValueError, match="is a 'decoder' stage but this run trains 'upsampler'"):
        fit(tmp_path, shapes_dir, None, *UPSAMPLER, f"init_from={decoder_stage}", "run.name=kind", "trainer.max_steps=1")


def test_lora_on_the_decoder_trains_the_attention_adapters_only_and_merges(
        decoder_stage, stages, shapes_dir, cache_dir, tiny_clip, tmp_path):  # noqa: F811
    run = fit(tmp_path, shapes_dir, cache_dir, *DECODER, f"init_from={decoder_stage}", "finetune=lora", "finetune.rank=2",
              "run.name=lora", "trainer.max_steps=2")
    checkpoint = last(run)
    adapter = set(checkpoint["state_dict"])
    assert adapter and all(".attn." in k and (".lora_A." in k or ".lora_B." in k) for k in adapter)
    assert {k.split(".attn.")[1].split(".")[0] for k in adapter} == {"qkv", "proj", "context_kv"}
    tuned_path = tmp_path / "artifacts" / "decoder" / "shapes.ckpt"
    tuned = load(tuned_path, clip=tiny_clip)
    base = read_stage(decoder_stage)["state_dict"]
    state = tuned.state_dict()
    for name, tensor in base.items():  # the base is untouched
        layer, _, leaf = name.rpartition(".")
        assert torch.equal(state[name if name in state else f"{layer}.base_layer.{leaf}"], tensor), name
    assert any(state[k].abs().sum() > 0 for k in adapter if ".lora_B." in k)  # the adapter moved from its zero start

    with pytest.raises(BaseMismatchError, match="holds other weights"):
        load(tuned_path, clip=tiny_clip, base=stages["decoder"])  # the same net, other weights

    lora_main(["merge", f"src={tuned_path}", f"out={tmp_path / 'plain.ckpt'}"])  # python -m unclip.lora merge ...
    plain = load(tmp_path / "plain.ckpt", clip=tiny_clip)
    with pytest.raises(SystemExit, match="usage: python -m unclip.lora merge src=LORA.ckpt out=PLAIN.ckpt"):
        lora_main(["merge", f"src={tuned_path}"])
    z_img = torch.nn.functional.normalize(torch.randn(2, tiny_clip.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    images = [m.sample(z_img, generator=torch.Generator().manual_seed(0), steps=3) for m in (tuned, plain)]
    print(f"max |merged - adapter on base| over a 3-step decode: {(images[0] - images[1]).abs().max():.2e}")
    assert (images[0] - images[1]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------- the upsampler
def test_upsampler_init_from_starts_at_the_stage_and_names_a_mismatch(shapes_dir, tmp_path):
    fit(tmp_path, shapes_dir, None, *UPSAMPLER, "experiment.name=base", "run.name=base", "trainer.max_steps=1")
    stage = tmp_path / "artifacts" / "upsampler" / "base.ckpt"
    fit(tmp_path, shapes_dir, None, *UPSAMPLER, f"init_from={stage}", "optim.optimizer.lr=0", "experiment.name=still",
        "run.name=still", "trainer.max_steps=1")
    base, still = (read_stage(p)["state_dict"] for p in (stage, tmp_path / "artifacts" / "upsampler" / "still.ckpt"))
    assert set(still) == set(base) and all(torch.equal(still[k], base[k]) for k in base)
    with pytest.raises(ValueError, match=r"does not fit this run's upsampler: .*shapes \(stage vs run\) net\."):
        fit(tmp_path, shapes_dir, None, *UPSAMPLER, f"init_from={stage}", "model.module.net.channels=16", "run.name=wide",
            "trainer.max_steps=1")
    with pytest.raises(ValueError, match="finetune=lora has no default targets for a upsampler stage"):
        fit(tmp_path, shapes_dir, None, *UPSAMPLER, f"init_from={stage}", "finetune=lora", "run.name=lora", "trainer.max_steps=1")


# ------------------------------------------------------------------------------------------ full, EMA, config
def test_full_fine_tuning_of_a_converted_prior_resumes_as_the_uninterrupted_run(
        published, shapes_dir, cache_dir, tmp_path, monkeypatch):  # noqa: F811
    args = [*PRIOR, f"init_from={published['stage']}", "optim.schedule=constant"]  # (cosine would follow max_steps)
    whole = last(fit(tmp_path, shapes_dir, cache_dir, *args, "run.name=whole", "trainer.max_steps=3"))
    fit(tmp_path, shapes_dir, cache_dir, *args, "run.name=split", "trainer.max_steps=2")
    calls = count_calls(monkeypatch, training, "init_weights")
    split = last(fit(tmp_path, shapes_dir, cache_dir, *args, "run.name=split", "trainer.max_steps=3"))
    assert split["global_step"] == 3 and not calls
    # not started again from init_from: the resumed run's weights are those of the run that never stopped
    assert all(torch.allclose(split["current_model_state"][k], v, atol=1e-6) for k, v in whole["current_model_state"].items())
    assert any(not torch.equal(v, read_stage(published["stage"])["state_dict"][k]) for k, v in split["state_dict"].items())


def test_the_ema_of_a_lora_net_shares_its_frozen_base(stages, tiny_clip):  # noqa: F811
    from types import SimpleNamespace

    from unclip.lora import apply_lora
    from unclip.modules.ema import NetEMA

    module = load(stages["diffusion"], clip=tiny_clip)
    apply_lora(module, 2, 2.0, 0.0, [r"blocks\.\d+\.attn\.qkv"])
    ema = NetEMA()
    ema.setup(SimpleNamespace(strategy=None, world_size=1), module, "fit")
    averaged = dict(ema.average.module.named_parameters())
    for name, p in module.net.named_parameters():
        assert (averaged[name] is p) == (not p.requires_grad), name  # frozen: the same tensor; adapter: its own copy
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {
        f"net.blocks.{i}.attn.qkv.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}
    with pytest.raises(ValueError, match=r"match no layer of the diffusion_prior net; its Linear/Conv layers are named e\.g\. text_proj"):
        apply_lora(load(stages["diffusion"], clip=tiny_clip), 2, 2.0, 0.0, ["nothing"])


def test_the_karlo_experiment_composes_lora_on_vit_l_14_webdataset_shards():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=finetune_karlo_prior", "data.train='/data/{0..9}.tar'"])
        full = compose("train", overrides=["experiment=finetune_karlo_prior", "finetune=full"])
    assert (cfg.model.name, cfg.clip.model_name, cfg.clip.pretrained, cfg.data.name) == ("published_prior", "ViT-L-14", "openai", "webdataset")
    assert cfg.init_from == "outputs/published/karlo_prior.ckpt" and cfg.experiment.name == "finetune_karlo_prior"
    assert cfg.data.cache_dir == "outputs/cache/webdataset/vit_l_14" and cfg.data.train == "/data/{0..9}.tar"
    assert cfg.finetune.method == "lora" and full.finetune.method == "full"


def test_a_run_stored_before_finetune_existed_resumes_as_full_fine_tuning():
    from omegaconf import OmegaConf

    current = OmegaConf.to_container(compose_train(Path("/tmp"), Path("/x"), None), resolve=False)
    stored = {k: v for k, v in current.items() if k != "finetune"}
    assert training.config_differences(stored, current) == []
    lora = {**current, "finetune": {**current["finetune"], "method": "lora"}}
    assert training.config_differences(stored, lora) == ["finetune.method: 'full' -> 'lora'"]


# ------------------------------------------------------------------------------- karlo's decoder and upsampler
@pytest.mark.slow
def test_karlos_converted_decoder_and_upsampler_fine_tune_from_their_stages(shapes_dir, cache_dir, tmp_path):
    from test_convert_karlo import write_karlo
    from unclip.convert import convert

    write_karlo(tmp_path / "karlo")
    stages_dir = convert("karlo", tmp_path / "karlo", tmp_path / "karlo_stages", clip_model="unclip-tiny",
                         clip_pretrained="none")
    for model, part, extra in (("published_decoder", "decoder", ["clip=unclip_tiny", "trainer.limit_val_batches=0"]),
                               ("published_upsampler", "upsampler", ["trainer.limit_val_batches=0"])):
        stage = stages_dir / f"{part}.ckpt"
        fit(tmp_path, shapes_dir, cache_dir, f"model={model}", f"init_from={stage}", *extra, "experiment.name=karlo",
            "run.name=still", "optim.optimizer.lr=0", "trainer.max_steps=1")
        base, still = (read_stage(p)["state_dict"] for p in (stage, tmp_path / "artifacts" / model / "karlo.ckpt"))
        assert set(still) == set(base) and all(torch.equal(still[k], base[k]) for k in base), model  # lr 0: the stage itself
        run = fit(tmp_path, shapes_dir, cache_dir, f"model={model}", f"init_from={stage}", *extra, "experiment.name=karlo",
                  "run.name=moved", "trainer.max_steps=2")
        moved = read_stage(tmp_path / "artifacts" / model / "karlo.ckpt")
        assert any(not torch.equal(moved["state_dict"][k], base[k]) for k in base), model  # it trained
        assert last(run)["global_step"] == 2 and moved["hyper_parameters"]["source"] == "karlo"
