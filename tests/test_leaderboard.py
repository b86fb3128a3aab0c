"""The image-level evaluation modes of ``evaluate.py`` (``unclip.eval``) on tiny random stages:
mode=images (keys, seen/unseen split, seed determinism), mode=leaderboard (every row, tables, plots,
grids, one wandb run per prior with the same summary keys), mode=steps (one row per step count), and
the errors that name what was wrong."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from test_ar_prior import ar_module, fit_on_cache
from test_decoder import tiny_unet_config
from test_pipeline import DECODER_DIFFUSION, save_stage
from test_prior import DIFFUSION as PRIOR_DIFFUSION
from test_prior import TINY_NET
from unclip.eval import baselines, generation, images, prompt_suites, protocol, settings, tables, wandb_logging
from unclip.eval.attributes import AttributeNet, ClassifierConfig, load_classifier, save_classifier
from unclip.loading import load
from unclip.pipeline import UnCLIPPipeline
from unclip.eval.run import mode_word_as_override, run
from unclip.modules.contrastive_prior import ContrastivePriorModule
from unclip.modules.decoder import DecoderModule
from unclip.modules.diffusion_prior import DiffusionPriorModule
from unclip.eval.prompt_suites import load_suite


@pytest.fixture(scope="module")
def stages(tiny_clip, cache_dir, tmp_path_factory):
    """Tiny random checkpoints of every prior kind and a decoder, trained (not at all) with the same random
    CLIP that evaluate builds from clip=unclip_tiny and seed 0; and a tiny random attribute classifier."""
    folder = tmp_path_factory.mktemp("leaderboard_stages")
    torch.manual_seed(0)
    diffusion = DiffusionPriorModule(TINY_NET, PRIOR_DIFFUSION, dict(kind="ddim", steps=4), clip=tiny_clip)
    ar = ar_module(tiny_clip)
    fit_on_cache(ar, cache_dir)  # fitted token bins: an unfitted tokenizer decodes every token to the mean
    contrastive = ContrastivePriorModule(TINY_NET, clip=tiny_clip)
    decoder = DecoderModule(tiny_unet_config(embed_dim=tiny_clip.embed_dim), DECODER_DIFFUSION,
                            dict(kind="ddim", steps=3, clip_denoised=True), clip=tiny_clip)
    for p in decoder.net.parameters():  # zero-initialised output layers would decode every z_i alike
        if torch.all(p == 0):
            torch.nn.init.normal_(p, std=0.05)
    classifier = AttributeNet(ClassifierConfig(image_size=12, channels=(4, 8), width=8)).eval()
    return {"diffusion": save_stage(diffusion, tiny_clip, folder / "diffusion.ckpt"),
            "ar": save_stage(ar, tiny_clip, folder / "ar.ckpt"),
            "contrastive": save_stage(contrastive, tiny_clip, folder / "contrastive.ckpt"),
            "decoder": save_stage(decoder, tiny_clip, folder / "decoder.ckpt"),
            "classifier": save_classifier(classifier, folder / "attributes.pt")}


def compose_evaluate(overrides):
    from hydra import compose, initialize_config_dir

    conf = os.path.join(os.path.dirname(__file__), "..", "conf")
    with initialize_config_dir(config_dir=os.path.abspath(conf), version_base="1.3"):
        return compose("evaluate", overrides=overrides)


def tiny_overrides(shapes_dir, cache_dir, stages, out):
    """The tiny shards and cache, the random tiny CLIP, and CPU-sized image settings."""
    return [f"paths.root={out}/root", f"paths.artifacts={out}/artifacts", "clip=unclip_tiny", f"out={out}",
            f"data.train={shapes_dir}/train-*.tar", f"data.val={shapes_dir}/val-*.tar",
            f"data.val_unseen={shapes_dir}/val_unseen-*.tar", f"data.cache_dir={cache_dir}", "data.num_workers=0",
            f"decoder={stages['decoder']}", f"classifier={stages['classifier']}", "pool=8", "suite_limit=4", "n=1",
            "decoder_settings.steps=2", "batch_size=4"]


class FakeWandb:
    """Records what log_wandb hands to wandb, one entry per run."""

    def __init__(self):
        self.runs = []

    def init(self, **kwargs):
        run = type("Run", (), {})()
        run.kwargs, run.logged, run.summary, run.finished = kwargs, [], {}, False
        run.log = run.logged.append
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    def Table(self, columns, data):  # noqa: N802 - wandb's names
        return {"columns": columns, "data": data}

    def Image(self, path):  # noqa: N802
        assert Path(path).exists()
        return path


def test_leaderboard_writes_every_row_tables_plots_grids_and_one_wandb_run_per_prior(
        shapes_dir, cache_dir, stages, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + [
        "mode=leaderboard", f"priors=[{stages['diffusion']},{stages['ar']},{stages['contrastive']}]",
        "+eval.diffusion_prior={sweep: {guidance_scale: [1, 2], steps: [2, 4]}, image_setting: {guidance_scale: 1, steps: 4}}",
        "+eval.ar_prior.sweep={guidance_scale: [1, 2]}", "+eval.ar_prior.image_setting={guidance_scale: 1}",
        "+eval.contrastive_prior={sweep: {guidance_scale: [1, 2]}, image_setting: {guidance_scale: 3}}",  # not swept: one more row
        "grid_prompts=2", "grid_n=2", "wandb=true"])
    result = run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "leaderboard.csv")))
    assert [(r["prior"], r["settings"]) for r in rows] == [
        ("baseline_zt", "-"), ("baseline_linear", "-"),
        ("diffusion_prior", "guidance_scale=1.0 steps=2"), ("diffusion_prior", "guidance_scale=1.0 steps=4"),
        ("diffusion_prior", "guidance_scale=2.0 steps=2"), ("diffusion_prior", "guidance_scale=2.0 steps=4"),
        ("ar_prior", "guidance_scale=1.0"), ("ar_prior", "guidance_scale=2.0"),
        ("contrastive_prior", "guidance_scale=1.0"), ("contrastive_prior", "guidance_scale=2.0"),
        ("contrastive_prior", "guidance_scale=3.0")]
    assert all(float(r["ms_per_sample"]) == 0.0 for r in rows[:2])  # the baselines cost nothing
    assert all(float(r["ms_per_sample"]) > 0.0 for r in rows[2:])
    assert all(r["cos_true"] and r["retrieval_top1_unseen"] for r in rows)
    assert float(rows[0]["cos_text"]) == pytest.approx(1.0, abs=1e-4)  # z_t as ẑ_i
    # one image-metric row per prior, at its image setting
    chosen = [(r["prior"], r["settings"]) for r in rows if r["image_setting"] == "True"]
    assert chosen == [("baseline_zt", "-"), ("baseline_linear", "-"), ("diffusion_prior", "guidance_scale=1.0 steps=4"),
                      ("ar_prior", "guidance_scale=1.0"), ("contrastive_prior", "guidance_scale=3.0")]
    assert all(r["attr_acc"] != "" and r["clip_score"] != "" for r in rows if r["image_setting"] == "True")
    assert all(r["attr_acc"] == "" for r in rows if r["image_setting"] == "False")
    images = result["image_rows"]
    assert [r["prior"] for r in images] == [p for p, _ in chosen]
    assert all(r["n_images"] == 4 and r["n_seen"] >= 1 and r["n_unseen"] >= 1 for r in images)
    text = (tmp_path / "leaderboard.md").read_text()
    assert "## Prior metrics" in text and "## Image metrics" in text and text.count("| contrastive_prior |") == 4
    for name in ("leaderboard_cost.png", "leaderboard_steps.png", "grids.png",
                 *[f"grid_{p}.png" for p, _ in chosen]):
        assert (tmp_path / name).stat().st_size > 1000, name
    # wandb: one run per prior in one group, the same summary keys for every prior
    assert [r.kwargs["name"] for r in fake.runs] == [p for p, _ in chosen]
    assert {r.kwargs["group"] for r in fake.runs} == {"leaderboard_shapes"}
    assert all(r.kwargs["job_type"] == "leaderboard" and r.finished for r in fake.runs)
    assert len({tuple(sorted(r.summary)) for r in fake.runs}) == 1 and "attr_acc_unseen" in fake.runs[0].summary
    assert len(fake.runs[2].logged[0]["sweep"]["data"]) == 4  # the diffusion prior's four sweep rows


def test_images_mode_writes_json_with_the_seen_unseen_split_and_one_seed_gives_one_result(
        shapes_dir, cache_dir, stages, tmp_path, tiny_clip):
    overrides = tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + ["mode=images", f"prior={stages['diffusion']}"]
    run(compose_evaluate(overrides))
    saved = json.loads((tmp_path / "images.json").read_text())
    metrics = saved["metrics"]
    for key in ("attr_acc", "attr_acc_seen", "attr_acc_unseen", "attr_acc_single", "attr_acc_two", "attr_acc_variant",
                "clip_score", "clip_score_seen", "clip_score_unseen", "fd_clip", "ms_per_image"):
        assert key in metrics, key
    assert metrics["n_seen"] + metrics["n_unseen"] == metrics["n_images"] == 4
    assert metrics["n_unseen"] >= 1 and metrics["fd_clip"] is not None and 0 <= metrics["clip_score"] <= 100
    assert "attr_acc_unseen" in (tmp_path / "images.md").read_text()
    # the same seed decodes the same images: every number but the timings is the same twice
    timing = {"ms_prior", "ms_decode", "ms_per_image"}
    untimed = lambda m: {k: v for k, v in m.items() if k not in timing}  # noqa: E731
    assert untimed(tables.json_safe(run(compose_evaluate(overrides))["metrics"])) == untimed(metrics)
    # evaluate_images is the mode's core: called directly it gives the same numbers, and another seed others
    cfg = compose_evaluate(overrides)
    context = images.ImageContext(generation.with_prior(UnCLIPPipeline(tiny_clip, load(stages["decoder"], clip=tiny_clip)),
                                            load(stages["diffusion"], clip=tiny_clip)),
                              prompt_suites.suite_entries("v1", 4), load_classifier(stages["classifier"]),
                              images.real_val_images(cfg, 16, 4))
    direct = {seed: images.evaluate_images(context.pipe, context.entries, 1, seed, context.classifier, context.real_images,
                                       {}, {"steps": 2}, batch_size=4) for seed in (0, 1)}
    assert tables.json_safe(untimed(direct[0])) == untimed(metrics)
    assert direct[1]["clip_score"] != direct[0]["clip_score"] and direct[1]["fd_clip"] != direct[0]["fd_clip"]


def test_a_baseline_is_a_prior_for_image_metrics(shapes_dir, cache_dir, stages, tmp_path):
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + ["mode=images", "prior=baseline_linear"])
    result = run(cfg)
    assert result["prior"] == "baseline_linear" and result["metrics"]["n_images"] == 4
    prior = baselines.load_prior("baseline_zt", None, tmp_path, cache_dir)
    z_txt = torch.randn(3, 128)
    torch.testing.assert_close(prior.sample(prior.condition({"txt_emb": z_txt})), torch.nn.functional.normalize(z_txt, dim=-1))


def test_steps_mode_writes_one_row_per_step_count(shapes_dir, cache_dir, stages, tmp_path):
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + [
        "mode=steps", f"prior={stages['diffusion']}", "prior_steps=[2,4]", "decoder_steps=[2,3]", "decoder_ddpm=true",
        "suite_limit=2"])
    rows = run(cfg)
    assert [(r["sweep"], r["sampler"], r["steps"]) for r in rows] == [
        ("prior", "ddim", 2), ("prior", "ddim", 4), ("decoder", "ddim", 2), ("decoder", "ddim", 3),
        ("decoder", "ddpm", DECODER_DIFFUSION["num_timesteps"])]
    decoder_rows = rows[2:]
    assert len({r["ms_prior"] for r in decoder_rows}) == 1  # one ẑ_i set for every decoder setting
    assert decoder_rows[-1]["ms_decode"] > decoder_rows[0]["ms_decode"]  # 100 ancestral steps cost more than 2
    written = list(csv.DictReader(open(tmp_path / "steps.csv")))
    assert len(written) == 5 and all(r["attr_acc"] != "" and r["clip_score"] != "" for r in written)
    assert (tmp_path / "steps.md").exists() and (tmp_path / "steps.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no sampling steps"):
        run(compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + ["mode=steps", f"prior={stages['ar']}"]))


def test_the_decoder_sampler_switches_to_ddpm_and_back(stages, tiny_clip):
    from unclip.loading import load

    decoder = load(stages["decoder"], clip=tiny_clip)
    with generation.stage_sampler(decoder, "ddpm") as sampler:
        assert decoder.sampler.kind == sampler.kind == "ddpm" and sampler.steps == 3
    assert decoder.sampler.kind == "ddim"
    with pytest.raises(ValueError, match="sampler.kind"):
        with generation.stage_sampler(decoder, "euler"):
            pass
    with pytest.raises(ValueError, match="unknown decoder setting"):
        generation.check_decoder_settings({"step": 4})


def test_errors_name_the_unknown_mode_prior_kind_and_missing_artifact(shapes_dir, cache_dir, stages, tmp_path, tiny_clip):
    assert mode_word_as_override(["evaluate", "leaderboard", "priors=[ar]"]) == ["evaluate", "mode=leaderboard", "priors=[ar]"]
    assert mode_word_as_override(["evaluate", "mode=steps"]) == ["evaluate", "mode=steps"]
    with pytest.raises(SystemExit, match="unknown evaluate mode 'leaderbord'"):
        mode_word_as_override(["evaluate", "leaderbord"])
    with pytest.raises(ValueError, match="unknown evaluate mode 'bogus'"):
        run(compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + ["mode=bogus"]))
    with pytest.raises(ValueError, match="unknown eval entries \\['sweeps'\\] for prior diffusion_prior"):
        settings.eval_settings(baselines.load_prior(stages["diffusion"], tiny_clip, tmp_path, cache_dir),
                               compose_evaluate(["+eval.diffusion_prior.sweeps={steps: [4]}"]))
    with pytest.raises(FileNotFoundError, match="no checkpoint 'missing_prior'"):
        baselines.load_prior("missing_prior", tiny_clip, tmp_path / "artifacts", cache_dir)
    with pytest.raises(ValueError, match="not a prior"):
        baselines.load_prior(stages["decoder"], tiny_clip, tmp_path, cache_dir)


def test_a_small_suite_subset_keeps_both_splits_in_suite_order():
    suite = load_suite("v1")
    for limit in (2, 4, 17):
        chosen = prompt_suites.spread_subset(suite, limit)
        assert len(chosen) == limit
        assert any("holdout" in e["tags"] for e in chosen) and any("holdout" not in e["tags"] for e in chosen)
        positions = [suite.index(e) for e in chosen]
        assert positions == sorted(positions)
    assert prompt_suites.suite_entries("v1", None) == suite
    assert settings.sweep_settings({"guidance_scale": [1, 2], "steps": [8]}) == [
        {"guidance_scale": 1.0, "steps": 8}, {"guidance_scale": 2.0, "steps": 8}]


@pytest.mark.parametrize("env_offline", [True, False])
def test_log_wandb_writes_an_offline_run(tmp_path, monkeypatch, env_offline):
    """Offline through WANDB_MODE; and without it, when wandb refuses to go online (no API key), offline
    anyway instead of failing after the whole leaderboard has run."""
    import wandb
    from omegaconf import OmegaConf

    from unclip.sampling import save_grid

    monkeypatch.setenv("WANDB_SILENT", "true")
    if env_offline:
        monkeypatch.setenv("WANDB_MODE", "offline")
    else:
        monkeypatch.delenv("WANDB_MODE", raising=False)
        real_init = wandb.init

        def init(mode=None, **options):
            if mode != "offline":
                raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")
            return real_init(mode=mode, **options)

        monkeypatch.setattr(wandb, "init", init)
    cfg = OmegaConf.create({"wandb_project": "unclip-test", "wandb_group": "leaderboard_test", "wandb_mode": None,
                            "out": str(tmp_path), "pool": 8, "seed": 0, "n": 1, "suite": "v1", "suite_limit": 4,
                            "decoder": "decoder", "decoder_settings": {"steps": None}})
    rows = [{"prior": "diffusion_prior", "settings": f"steps={s}", "guidance_scale": 1.0, "steps": s, "ms_per_sample": 1.0 * s,
             "image_setting": s == 4, **{k: 0.5 for k in protocol.PRIOR_COLUMNS}} for s in (2, 4)]
    image_row = {"prior": "diffusion_prior", **{k: 0.25 for k in images.IMAGE_COLUMNS}, "n_images": 4}
    grid = save_grid(torch.zeros(4, 3, 8, 8), 2, tmp_path / "grid.png")
    mode = wandb_logging.log_wandb(cfg, "diffusion_prior", rows, image_row, grid)
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    assert mode == (None if env_offline else "offline")  # the next prior goes straight to offline


def test_steps_mode_sweeps_each_sampler_the_fast_ones_on_trailing_steps(shapes_dir, cache_dir, stages, tmp_path):
    cfg = compose_evaluate(tiny_overrides(shapes_dir, cache_dir, stages, tmp_path) + [
        "mode=steps", f"prior={stages['diffusion']}", "prior_steps=[2]", "decoder_steps=[2]", "decoder_ddpm=false",
        "suite_limit=2", "samplers=[ddim,dpmpp_2m]"])
    rows = run(cfg)
    assert [(r["sweep"], r["sampler"], r["steps"]) for r in rows] == [
        ("prior", "ddim", 2), ("prior", "dpmpp_2m", 2), ("decoder", "ddim", 2), ("decoder", "dpmpp_2m", 2)]
    for row, key in ((rows[1], "prior_settings"), (rows[3], "decoder_settings")):
        assert {"sampler=dpmpp_2m", "steps=trailing2"} <= set(row[key].split())
    assert rows[0]["attr_acc"] == rows[0]["attr_acc"] and (tmp_path / "steps.png").stat().st_size > 1000
