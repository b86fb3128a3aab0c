"""The demo's stage runner: dependencies, side-by-side stages, threads, resuming and failures."""

import json
import os
import time

import pytest

from unclip.demo import (PROFILES, ROOT, Stage, StageFailed, auto_precision, bf16_unit, check_profile, expectation, parse_cli, run_stages,
                         stages)


def script(done, body: str = "pass") -> tuple[str, ...]:
    """A stage that runs ``body``, then records when it ran and with how many threads, into ``done``."""
    code = ("import json, os, sys, time\nstart = time.time()\n" + body + "\n"
            f"json.dump({{'start': start, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS']}}, "
            f"open({str(done)!r}, 'w'))")
    return ("-c", code)


def record(path) -> dict:
    return json.loads(path.read_text())


def wait_for(path) -> str:
    """Script text: wait (up to 30 s) until ``path`` exists. Stages meet through files, not through timing."""
    return f"deadline = time.time() + 30\nwhile not os.path.exists({str(path)!r}) and time.time() < deadline: time.sleep(0.02)\n"


def test_stages_wait_for_what_they_need_and_run_side_by_side(tmp_path):
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    # a runs until c has finished, so both were running at once and nothing runs beside b
    plan = [Stage("a", script(a, wait_for(c) + "time.sleep(0.3)"), a),
            Stage("b", script(b, f"assert os.path.exists({str(a)!r})"), b, needs=("a",)),
            Stage("c", script(c, "pass"), c)]
    timings = {}
    run_stages(plan, jobs=2, logs=tmp_path / "logs", timings=timings, cpus=4)
    assert set(timings) == {"a", "b", "c"}
    assert record(b)["start"] >= record(a)["end"]  # b waited for a
    assert record(c)["start"] < record(a)["end"]  # c ran while a did
    assert record(a)["threads"] == record(c)["threads"] == "2"  # two side by side share the 4 cores
    assert record(b)["threads"] == "4"  # nothing else could run beside it
    assert (tmp_path / "logs" / "b.log").exists()


def test_one_job_runs_stages_one_after_another(tmp_path):
    a, c = tmp_path / "a.json", tmp_path / "c.json"
    run_stages([Stage("a", script(a, "time.sleep(0.3)"), a), Stage("c", script(c), c)], jobs=1, logs=tmp_path, timings={},
               cpus=2)
    assert record(c)["start"] >= record(a)["end"] and record(a)["threads"] == "2"


def test_finished_stages_are_skipped_and_a_failure_names_its_log(tmp_path):
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    a.write_text("{}")  # finished in an earlier run
    plan = [Stage("a", ("-c", "raise SystemExit('should not run')"), a),
            Stage("b", ("-c", "print('loss went nan'); raise SystemExit(3)"), b, needs=("a",)),
            Stage("c", script(c), c, needs=("b",))]
    timings = {}
    with pytest.raises(StageFailed, match=r"(?s)stage b failed \(exit code 3\).*b\.log.*loss went nan.*Rerun"):
        run_stages(plan, jobs=2, logs=tmp_path / "logs", timings=timings, cpus=2)
    assert timings == {} and not c.exists()


def test_a_stage_that_exits_cleanly_without_its_artifact_fails(tmp_path):
    plan = [Stage("a", ("-c", "pass"), tmp_path / "never.json")]
    with pytest.raises(StageFailed, match="stage a failed \\(no .*never.json\\)"):
        run_stages(plan, jobs=1, logs=tmp_path, timings={}, cpus=1)


def test_unknown_needs_and_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="needs unknown stages \\['missing'\\]"):
        run_stages([Stage("a", ("-c", "pass"), tmp_path / "a", needs=("missing",))], jobs=1, logs=tmp_path, timings={})
    with pytest.raises(SystemExit, match="bad argument 'job=2'"):
        parse_cli(["job=2"])
    with pytest.raises(SystemExit, match="bad argument 'profile=huge'.*profile=full\\|fast"):
        parse_cli(["profile=huge"])
    with pytest.raises(SystemExit, match="bad argument 'precision=fp8'.*precision=auto\\|32-true\\|bf16-mixed"):
        parse_cli(["precision=fp8"])
    assert parse_cli(["jobs=3", "profile=fast", "precision=32-true"]) == ("fast", 3, "32-true")
    assert parse_cli([])[0] == "full"  # recognisable pictures by default; sample.py's defaults read its root
    assert parse_cli([])[2] == "auto"
    assert PROFILES["full"]["root"] == "outputs"


def test_auto_precision_trains_in_bf16_only_where_bf16_matmuls_are_native():
    flags = "flags : fpu sse2 avx2 avx512f avx512bw"
    assert auto_precision(flags + " avx512_bf16", cuda=False) == "bf16-mixed"
    assert auto_precision(flags + " amx_bf16 amx_tile", cuda=False) == "bf16-mixed"
    assert auto_precision(flags, cuda=False) == "32-true"  # emulated bf16 would be ~100x slower than fp32
    assert auto_precision("", cuda=True) == "bf16-mixed"


def test_every_training_stage_trains_in_the_precision_asked_for():
    plan = stages(PROFILES["full"], "bf16-mixed")
    training = [s for s in plan if s.args[0] == "train.py"]
    assert {s.name for s in training} == {"clip", "decoder", "upsampler", "diffusion_prior", "ar_prior", "contrastive_prior"}
    assert all("trainer.precision=bf16-mixed" in s.args for s in training)
    assert not any("trainer.precision=bf16-mixed" in s.args for s in plan if s.args[0] != "train.py")
    assert not any(a.startswith("trainer.precision=") for s in stages(PROFILES["full"]) for a in s.args)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_demo_plan_orders_every_stage_after_what_it_reads(profile):
    plan = stages(PROFILES[profile])
    order = [s.name for s in plan]
    assert set(order) == {"data", "clip", "embed", "decoder", "attributes", "upsampler", "diffusion_prior", "ar_prior",
                          "contrastive_prior"}
    for stage in plan:
        assert all(order.index(n) < order.index(stage.name) for n in stage.needs), stage.name
    needs = {s.name: s.needs for s in plan}
    assert needs["embed"] == ("clip",)
    assert {"decoder", "diffusion_prior", "ar_prior", "contrastive_prior"} <= {s.name for s in plan if "embed" in s.needs}
    root = ROOT / PROFILES[profile]["root"]  # under the repository, wherever the demo is started from
    assert all(root in s.done.parents for s in plan)  # a profile keeps to its own root
    assert all(f"paths.root={root}" in s.args for s in plan if s.name != "data")


def test_a_stage_takes_the_cores_its_finished_neighbour_leaves(tmp_path):
    a, c, seen = tmp_path / "a.json", tmp_path / "c.json", tmp_path / "c-read-its-share"
    # c starts beside a with half the cores and says so; a then ends, and c waits for all four
    wait = ("path = os.environ['UNCLIP_THREADS_FILE']; first = open(path).read(); "
            f"open({str(seen)!r}, 'w').close(); deadline = time.time() + 30\n"
            "while open(path).read() != '4' and time.time() < deadline: time.sleep(0.02)\n"
            "assert first == '2' and open(path).read() == '4'")
    run_stages([Stage("a", script(a, wait_for(seen)), a), Stage("c", script(c, wait), c)], jobs=2,
               logs=tmp_path / "logs", timings={}, cpus=4)
    assert record(c)["end"] > record(a)["end"]


def test_a_failure_stops_the_stage_beside_it(tmp_path):
    started, slow = tmp_path / "slow-started", tmp_path / "slow.json"
    plan = [Stage("slow", script(slow, f"open({str(started)!r}, 'w').close(); time.sleep(60)"), slow),
            Stage("bad", ("-c", f"import os, time\n{wait_for(started)}raise SystemExit(1)"), tmp_path / "bad.json")]
    begin = time.time()
    with pytest.raises(StageFailed, match="stage bad failed"):
        run_stages(plan, jobs=2, logs=tmp_path / "logs", timings={}, cpus=2)
    assert started.exists() and not slow.exists() and time.time() - begin < 30


def test_training_runs_follow_the_demo_threads_file(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from unclip.training import ThreadShare, build_trainer

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.root={tmp_path}", "strategy.accelerator=cpu"])
    monkeypatch.delenv(ThreadShare.ENV, raising=False)
    assert not any(isinstance(c, ThreadShare) for c in build_trainer(cfg, tmp_path).callbacks)
    monkeypatch.setenv(ThreadShare.ENV, str(tmp_path / "x.threads"))
    assert any(isinstance(c, ThreadShare) for c in build_trainer(cfg, tmp_path).callbacks)


def test_a_root_made_by_another_recipe_is_refused(tmp_path):
    plan = stages(PROFILES["fast"])
    root = tmp_path / "outputs"
    moved = [Stage(s.name, s.args, root / s.done.relative_to(ROOT / "outputs"), s.needs) for s in plan]
    check_profile(root, "fast", moved)  # empty: claimed for fast
    assert json.loads((root / "demo" / "profile.json").read_text()) == {"profile": "fast"}
    with pytest.raises(StageFailed, match="not profile full"):
        check_profile(root, "full", moved)
    (root / "demo" / "profile.json").unlink()
    decoder = next(s for s in moved if s.name == "decoder").done
    decoder.parent.mkdir(parents=True)
    decoder.write_text("")  # a stage from before the stamp, e.g. an older demo
    with pytest.raises(StageFailed, match="made by something other than this demo"):
        check_profile(root, "fast", moved)


def test_thread_share_follows_its_file(tmp_path):
    import torch

    from unclip.training import ThreadShare

    before = torch.get_num_threads()
    path = tmp_path / "stage.threads"
    callback = ThreadShare(path, every=2)
    try:
        callback.on_train_batch_start(None, None, None, 0)  # no file yet: unchanged
        assert torch.get_num_threads() == before
        path.write_text("1")
        callback.on_train_batch_start(None, None, None, 1)  # not a step it reads on
        assert torch.get_num_threads() == before or before == 1
        callback.on_train_batch_start(None, None, None, 2)
        assert torch.get_num_threads() == 1
        path.write_text("garbage")
        callback.on_train_batch_start(None, None, None, 4)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_killing_the_demo_stops_its_stages(tmp_path):
    import signal
    import subprocess
    import sys

    started, pid_file = tmp_path / "started", tmp_path / "stage.pid"
    stage = ("-c", f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                   f"open({str(started)!r}, 'w').close()\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from unclip.demo import Stage, run_stages, stop_on_sigterm\n"
        f"stop_on_sigterm(); run_stages([Stage('long', {stage!r}, Path({str(tmp_path / 'never')!r}))], 1, "
        f"Path({str(tmp_path / 'logs')!r}), {{}})")], cwd=ROOT)
    deadline = time.time() + 30
    while not started.exists() and time.time() < deadline:
        time.sleep(0.05)
    assert started.exists()
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 143
    child = int(pid_file.read_text())
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(child), "the stage outlived the demo"


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_grid_marks_held_out_and_two_object_rows_and_an_extra_blob_is_wrong(tmp_path, monkeypatch):
    import torch

    import unclip.eval.attributes as attributes
    from unclip.data.shapes import DEFAULT_HOLDOUT
    from unclip.demo_grids import grid_rows, score_grid
    from unclip.eval.attributes import CellPredictions, objects_from_caption
    from unclip.sampling import save_grid
    from helpers import picture

    rows = grid_rows()
    assert [g for g, _, _ in rows].count("held-out") >= 4 and [g for g, _, _ in rows].count("two") >= 4
    for group, prompt, objects in rows:  # each row's labels are what its prompt says
        assert objects_from_caption(prompt) == [{k: o[k] for k in o} for o in objects], prompt
        held_out = [(o["shape"], o["color"]) in DEFAULT_HOLDOUT for o in objects]
        assert any(held_out) == (group == "held-out") and (len(objects) == 2) == (group == "two")

    def drawn(objects, extra=False):  # what a perfect drawing of the row holds (free cells for unplaced objects)
        free = iter(["top left", "bottom right", "top right"])
        placed = [{"size": "large", "position": next(free), **o} if "position" not in o else {"size": "large", **o}
                  for o in objects]
        return placed + ([{"shape": "star", "color": "red", "size": "small", "position": "bottom left"}] if extra else [])

    images = [drawn(objects, extra=(i == 0)) for i, (_, _, objects) in enumerate(rows)]
    monkeypatch.setattr(attributes, "predict", lambda classifier, pixels: CellPredictions.from_objects(images))
    pixels = torch.stack([torch.from_numpy(picture(objects, seed=i)).permute(2, 0, 1) * 2 - 1  # the outline reader's
                          for i, objects in enumerate(images)])
    scores = score_grid(None, pixels, rows, n=1)
    singles = sum(g == "single" for g, _, _ in rows)
    assert scores["attr_acc"] == scores["attr_acc_two"] == scores["right_held-out"] == scores["right_two"] == 1.0
    assert scores["right_single"] == scores["outline_right_single"] == pytest.approx(1 - 1 / singles)  # row 0: a second blob
    assert scores["rows"][0] == {"prompt": rows[0][1], "right": 0.0, "outline_right": 0.0, "count": 0.0}  # ...and its row says why
    assert all(r["right"] == r["outline_right"] == r["count"] == 1.0 for r in scores["rows"][1:])
    assert scores["outline_right_held-out"] == scores["outline_right_two"] == 1.0
    path = save_grid(torch.zeros(len(rows) * 2, 3, 16, 16), 2, tmp_path / "grid.png", row_labels=[p for _, p, _ in rows])
    from PIL import Image

    with Image.open(path) as image:
        assert image.width > 2 * 18 + 100 and image.height == len(rows) * 18 + 2  # a label strip beside the images


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_training_stage_of_the_demo_composes_with_its_overrides(profile):
    """A mistyped override would fail a demo only minutes in; composing every stage's command line here
    catches it, and checks the prior guidance lands where the modules read it."""
    from hydra import compose, initialize_config_dir

    plan = {s.name: s for s in stages(PROFILES[profile], "bf16-mixed")}
    composed = {}
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, stage in plan.items():
            if stage.args[0] == "train.py":
                composed[name] = compose("train", overrides=list(stage.args[1:]))
    assert set(composed) == {"clip", "decoder", "upsampler", "diffusion_prior", "ar_prior", "contrastive_prior"}
    assert all(cfg.trainer.precision == "bf16-mixed" for cfg in composed.values())
    if profile == "full":
        assert composed["diffusion_prior"].sampler.guidance_scale == 3
        assert composed["decoder"].sampler.guidance_scale == 3 and composed["decoder"].model.module.text_cond
        assert composed["ar_prior"].model.module.sampling.guidance_scale == 3
        assert composed["contrastive_prior"].model.module.guidance_scale == 1
        assert composed["clip"].model.module.hard_negatives


def test_regridding_names_bad_arguments_and_needs_a_finished_demo(monkeypatch, tmp_path):
    import unclip.demo as demo

    with pytest.raises(SystemExit, match="bad argument 'prior_guidance=high'.*samples=N"):
        demo.regrid(["prior_guidance=high"])
    with pytest.raises(SystemExit, match="bad argument 'samples=0'"):
        demo.regrid(["samples=0"])
    with pytest.raises(SystemExit, match="bad argument 'layout=maybe'"):
        demo.regrid(["compose=object_phrases", "layout=maybe"])
    monkeypatch.setitem(demo.PROFILES, "full", {**PROFILES["full"], "root": str(tmp_path)})
    with pytest.raises(SystemExit, match="grids need a finished demo; missing stages: data, clip"):
        demo.main(["grids", "samples=4", "prior_guidance=3"])


def test_the_grids_find_the_demos_stages_beside_a_decoder_published_for_an_a_b(tmp_path):
    """The demo publishes each stage as KIND/shapes; with decoder/noise beside decoder/shapes the bare kind is
    ambiguous, so the grids name the demo's own stages."""
    from unclip.demo_grids import demo_stage
    from unclip.loading import resolve

    plan = stages({**PROFILES["full"], "root": str(tmp_path)})
    for stage in plan:
        stage.done.parent.mkdir(parents=True, exist_ok=True)
        stage.done.touch()
    (tmp_path / "artifacts" / "decoder" / "noise.ckpt").touch()
    artifacts = tmp_path / "artifacts"
    with pytest.raises(FileNotFoundError, match="several stages"):
        resolve("decoder", artifacts)
    done = {s.name: s.done for s in plan}
    for kind in ("decoder", "upsampler", "diffusion_prior", "ar_prior", "contrastive_prior"):
        assert resolve(demo_stage(kind), artifacts) == done[kind]


def test_regridding_passes_the_decoder_and_upsampler_of_an_a_b_and_names_its_folder_after_them(monkeypatch, tmp_path):
    import unclip.demo as demo

    monkeypatch.setitem(demo.PROFILES, "full", {**PROFILES["full"], "root": str(tmp_path)})
    for stage in stages(demo.PROFILES["full"]):
        stage.done.parent.mkdir(parents=True, exist_ok=True)
        stage.done.touch()
    calls = []
    monkeypatch.setattr(demo, "sample_grids", lambda *args, **kw: calls.append((args, kw)) or args[5].mkdir(parents=True) or {})
    demo.regrid(["samples=2", "priors=diffusion_prior", "upsampler=upsampler/zi"])
    demo.regrid(["samples=2", "priors=diffusion_prior", "decoder=decoder/noise"])
    (first, _), (second, _) = calls
    assert first[6:8] == ("decoder/shapes", "upsampler/zi") and first[5].name.endswith("_upsampler-zi")
    assert second[6:8] == ("decoder/noise", "upsampler/shapes") and second[5].name.endswith("_decoder-noise")


def test_grid_settings_become_generate_options_and_none_turns_each_off():
    """The profile's grid defaults compose, place and complete; ``grids compose=none complete=none`` samples prompts as
    written: no splitter, no layout (which needs one) and no completer reach the pipeline."""
    from unclip.completion import complete_shapes
    from unclip.composition import object_phrases
    from unclip.demo_grids import generate_options

    defaults = PROFILES["full"]["grids"]
    assert generate_options(defaults) == {"compose": object_phrases, "layout": True, "complete": complete_shapes}
    plain = generate_options({**defaults, "compose": None, "layout": False, "complete": None, "decoder_guidance": 5.0})
    assert plain == {"decoder_guidance": 5.0}


def test_the_grid_parser_takes_none_and_refuses_an_unknown_completer(monkeypatch, tmp_path):
    import unclip.demo as demo

    with pytest.raises(SystemExit, match="bad argument 'complete=llm'"):
        demo.regrid(["complete=llm"])
    monkeypatch.setitem(demo.PROFILES, "full", {**PROFILES["full"], "root": str(tmp_path)})
    with pytest.raises(SystemExit, match="grids need a finished demo"):  # parsed, then stopped at the missing stages
        demo.regrid(["complete=none", "compose=none", "complete=shapes"])


def test_the_demo_tells_how_long_each_profile_takes_in_either_precision():
    """Every profile has a time for fp32 and for each kind of CPU bf16 unit (a missing one would stop the demo at
    its first line), and only a long fp32 run points to the quick profile."""
    for name, profile in PROFILES.items():
        assert profile["expect"]["32-true"] in expectation(name, "32-true", unit="amx")  # fp32 whatever the CPU has
        for unit in ("amx", "avx512_bf16"):  # bf16 by the CPU's bf16 unit: AMX tiles ~2.5x the dot products alone
            assert f"{unit.upper().replace('_', '-')} it takes {profile['expect'][unit]}" in expectation(name, "bf16-mixed", unit)
    assert "make demo-fast" in expectation("full", "32-true")
    assert "demo-fast" not in expectation("full", "bf16-mixed", "amx") + expectation("fast", "32-true")
    assert "emulates bf16" in expectation("full", "bf16-mixed", unit="none")
    assert bf16_unit("fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile") == "amx"
    assert bf16_unit("fpu avx2 avx512f avx512_bf16") == "avx512_bf16"
    assert bf16_unit("fpu avx2") is None
