"""The demo's stage runner: dependencies, side-by-side stages, threads, resuming and failures."""

import json

import pytest

from unclip.demo import PROFILES, Stage, StageFailed, parse_cli, run_stages, stages


def script(done, body: str = "pass") -> tuple[str, ...]:
    """A stage that runs ``body``, then records when it ran and with how many threads, into ``done``."""
    code = ("import json, os, sys, time; start = time.time(); " + body + "; "
            f"json.dump({{'start': start, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS']}}, "
            f"open({str(done)!r}, 'w'))")
    return ("-c", code)


def record(path) -> dict:
    return json.loads(path.read_text())


def test_stages_wait_for_what_they_need_and_run_side_by_side(tmp_path):
    a, b, c = (tmp_path / f"{n}.json" for n in "abc")
    plan = [Stage("a", script(a, "time.sleep(0.6)"), a),
            Stage("b", script(b, f"assert os.path.exists({str(a)!r})"), b, needs=("a",)),
            Stage("c", script(c, "time.sleep(0.6)"), c)]
    timings = {}
    run_stages(plan, jobs=2, logs=tmp_path / "logs", timings=timings, cpus=4)
    assert set(timings) == {"a", "b", "c"}
    assert record(b)["start"] >= record(a)["end"]  # b waited for a
    assert record(c)["start"] < record(a)["end"] and record(a)["start"] < record(c)["end"]  # a and c overlapped
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
    with pytest.raises(SystemExit, match="bad argument 'profile=huge'.*profile=fast\\|full"):
        parse_cli(["profile=huge"])
    assert parse_cli(["jobs=3", "profile=full"]) == ("full", 3)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_demo_plan_orders_every_stage_after_what_it_reads(profile):
    plan = stages(PROFILES[profile])
    order = [s.name for s in plan]
    assert set(order) == {"data", "clip", "embed", "decoder", "attributes", "upsampler", "diffusion_prior", "ar_prior"}
    for stage in plan:
        assert all(order.index(n) < order.index(stage.name) for n in stage.needs), stage.name
    needs = {s.name: s.needs for s in plan}
    assert needs["embed"] == ("clip",)
    assert {"decoder", "diffusion_prior", "ar_prior"} <= {s.name for s in plan if "embed" in s.needs}
    root = PROFILES[profile]["root"]
    assert all(str(s.done).startswith(root) for s in plan)  # a profile keeps to its own root
    assert all(f"paths.root={root}" in s.args for s in plan if s.args[0] == "train.py")


def test_a_stage_takes_the_cores_its_finished_neighbour_leaves(tmp_path):
    a, c = tmp_path / "a.json", tmp_path / "c.json"
    # c starts beside a with half the cores, then waits until its threads file grants all four
    wait = ("path = os.environ['UNCLIP_THREADS_FILE']; first = open(path).read(); "
            "deadline = time.time() + 20\nwhile open(path).read() != '4' and time.time() < deadline: time.sleep(0.05)\n"
            "assert first == '2' and open(path).read() == '4'")
    run_stages([Stage("a", script(a, "time.sleep(0.3)"), a), Stage("c", script(c, wait), c)], jobs=2,
               logs=tmp_path / "logs", timings={}, cpus=4)
    assert record(c)["end"] > record(a)["end"]


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
