import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))


def compose_train(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes_and_resolves(model, tmp_path):
    import unclip.training  # noqa: F401  (registers the resolvers train.py uses)

    extra = []
    if model in ("published_prior", "dalle2_pytorch_prior", "published_decoder", "published_upsampler"):  # net, process and sampler come from the converted stage
        from unclip.convert import convert

        with pytest.raises(Exception, match="pass init_from=PATH"):
            OmegaConf.to_container(compose_train(f"model={model}"), resolve=True)
        if model == "published_prior":
            from test_convert import TINY_CLIP, tiny_published_prior, write_published

            write_published(tmp_path, tiny_published_prior())
            stage = convert("karlo", tmp_path, tmp_path / "karlo.ckpt", **TINY_CLIP)
        elif model in ("published_decoder", "published_upsampler"):
            from test_convert import TINY_CLIP
            from test_convert_karlo import write_karlo

            write_karlo(tmp_path / "karlo")
            part = model.split("_")[1]
            stage = convert("karlo", tmp_path / "karlo", tmp_path / f"{part}.ckpt", part=part, **TINY_CLIP)
        else:
            from test_convert_laion import TINY_CLIP, write_folder

            stage = convert("dalle2_pytorch_prior", write_folder(tmp_path / "laion"), tmp_path / "laion.ckpt", **TINY_CLIP)
        extra = [f"init_from={stage}"]
    cfg = compose_train(f"model={model}", "trainer.max_steps=2", *extra)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["trainer"]["max_steps"] == 2 and resolved["model"]["name"] == model
    assert resolved["data"]["fields"] == resolved["model"]["fields"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_compose_and_wrap_policies_name_real_classes(strategy):
    cfg = compose_train(f"strategy={strategy}")
    for name in cfg.strategy.get("wrap_classes") or []:
        assert isinstance(get_class(name), type)
    if strategy == "fsdp":
        import lightning.pytorch as pl
        from unclip.training import build_strategy

        with pytest.raises(ValueError, match="GPU"):  # Lightning refuses FSDP on CPU: composition is what runs here
            pl.Trainer(accelerator="cpu", devices=1, strategy=build_strategy(cfg), logger=False)


@pytest.mark.parametrize("group", ["logger=wandb", "logger=tensorboard", "launcher=local", "launcher=slurm", "data=webdataset"])
def test_other_groups_compose(group):
    cfg = compose_train(group, "data.train=/x") if group == "data=webdataset" else compose_train(group)
    assert cfg is not None


def run_cli(*args, cwd=ROOT, timeout=300):
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cfg_job_prints_the_complete_config():
    result = run_cli("--cfg", "job")
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert {"data", "clip", "model", "optim", "strategy", "trainer", "logger", "experiment", "paths"} <= set(printed)
    assert printed.trainer._target_ == "lightning.pytorch.Trainer"


def test_bad_keys_and_missing_values_fail_with_hydras_message(tmp_path):
    unknown = run_cli("trainer.max_stepz=3")
    assert unknown.returncode != 0 and "Could not override 'trainer.max_stepz'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    missing = run_cli("data=webdataset", "trainer.max_steps=1", f"paths.root={tmp_path}")  # its run dir: not the repo's
    assert missing.returncode != 0 and "missing required config value(s): data.train" in missing.stderr


@pytest.mark.parametrize("overrides", [[], ["diffusion=linear", "sampler=ddpm"],
                                       ["diffusion.prediction=eps", "diffusion.loss_weighting=min_snr", "sampler.steps=ddim25"]])
def test_diffusion_prior_config_builds_its_module(overrides, tiny_clip):
    from unclip.training import build_module

    cfg = compose_train("model=diffusion_prior", *overrides)
    module = build_module(cfg, tiny_clip)
    assert module.diffusion.prediction == cfg.diffusion.prediction and module.sampler.kind == cfg.sampler.kind
    assert module.net.config.text_width == tiny_clip.text_width  # the text tower decides the token width
    assert type(module.hparams["diffusion"]) is dict  # plain containers: checkpoints load with weights_only=True


def test_bad_diffusion_choice_is_named(tiny_clip):
    from unclip.training import build_module

    with pytest.raises(ValueError, match="diffusion.prediction"):
        build_module(compose_train("model=diffusion_prior", "diffusion.prediction=epsilon"), tiny_clip)



SAMPLERS = sorted(p.stem for p in (CONF / "sampler").glob("*.yaml"))


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_config_composes_into_a_sampler(sampler):
    """``model=decoder sampler=decoder_dpmpp_2m`` and the like: the group override reaches the module's
    sampler, and a stage's variants keep its DDIM config's guidance and clamp."""
    from unclip.diffusion import GaussianDiffusion, Sampler

    staged = sampler.startswith(("decoder_", "upsampler_"))
    stage, kind = sampler.split("_", 1) if staged else ("diffusion_prior", sampler)
    model = "upsampler_32_64" if stage == "upsampler" else stage
    cfg = compose_train(f"model={model}", f"sampler={sampler}")
    built = Sampler(**OmegaConf.to_container(cfg.model.module.sampler, resolve=True))  # what the module is handed
    assert built.kind == kind
    assert built.process(GaussianDiffusion.from_config(**cfg.diffusion)).num_timesteps <= cfg.diffusion.num_timesteps
    if staged:
        ddim = compose_train(f"sampler={stage}_ddim").sampler
        assert (built.guidance_scale, built.clip_denoised) == (ddim.guidance_scale, ddim.clip_denoised)


def test_a_run_stored_before_a_key_existed_resumes_with_that_keys_old_behaviour():
    from unclip.training import config_differences

    current = OmegaConf.to_container(compose_train("clip=unclip_tiny"), resolve=False)
    stored = OmegaConf.to_container(compose_train("clip=unclip_tiny"), resolve=False)
    del stored["clip"]["init_seed"]  # a run dir written before random CLIPs had their own seed (they were built from seed 0)
    assert config_differences(stored, current) == []
    current["clip"]["init_seed"] = 1
    assert config_differences(stored, current) == ["clip.init_seed: 0 -> 1"]
