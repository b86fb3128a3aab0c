"""``make demo``: every stage at demo size on the built-in shapes data, each skipped once finished, ending
in a grid of prompts × samples for each prior (``outputs/demo/grid_<prior>.png``) scored by the
project's attribute classifier (``outputs/demo/results.json``).

    python -m unclip.demo                 # profile=full: the schedule whose pictures are recognisable
    python -m unclip.demo profile=fast    # every stage small, under outputs/fast/
    python -m unclip.demo precision=32-true   # default auto: bf16-mixed on GPUs and CPUs with native bf16

Stages run as the user would run them (``python -m unclip.data.shapes``, ``python train.py``,
``python embed.py``, ``python train_classifier.py``), so an interrupted demo resumes: data and
cache shards are written atomically and training resumes from its run directory's ``last.ckpt``.
Stages that do not wait on each other run side by side (``jobs=``, default 2), because small CPU models
use two cores in one process less well than two processes use one each. Each stage's output goes to
``DEMO/logs/STAGE.log`` and its time to ``DEMO/timings.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from unclip.demo_grids import PUBLISHED, demo_stage, sample_grids
from unclip.precision import PRECISIONS, auto_precision, bf16_unit

ROOT = Path(__file__).resolve().parents[1]
QUIET = ("trainer.enable_progress_bar=false", "run.name=demo")


@dataclass(frozen=True)
class Stage:
    """One command of the demo: ``python ARGS``, finished once ``done`` exists, started once ``needs`` are."""

    name: str
    args: tuple[str, ...]
    done: Path
    needs: tuple[str, ...] = ()


class StageFailed(RuntimeError):
    pass


def run_stages(stages: list[Stage], jobs: int, logs: Path, timings: dict, cpus: int | None = None,
               poll_s: float = 0.2, on_finish=None) -> None:
    """Runs every unfinished stage once the stages it needs have finished, up to ``jobs`` at a time, in
    list order (put the longest chain first). Running stages share the cores: each starts with
    ``cpus // jobs`` threads (every core when nothing could run beside it), and a training stage takes
    the cores a finished neighbour leaves (``ThreadShare`` reads ``logs/STAGE.threads``). A failed stage
    stops the others and raises with its log's tail; rerunning picks up from what finished. Stages that are
    not Lightning runs (data, embed, attributes) keep the threads they started with. ``on_finish(name)`` is
    called after each stage, once its time is in ``timings``."""
    from unclip.training import ThreadShare

    cpus = cpus or os.cpu_count() or 1
    each = max(1, cpus // jobs)  # a stage's threads while others run beside it
    by_name = {s.name: s for s in stages}
    for stage in stages:
        unknown = [n for n in stage.needs if n not in by_name]
        if unknown:
            raise ValueError(f"stage {stage.name!r} needs unknown stages {unknown}")
    finished = {s.name for s in stages if s.done.exists()}
    for name in sorted(finished):
        print(f"[demo] {name}: done already ({by_name[name].done})", flush=True)
    pending = [s for s in stages if s.name not in finished]
    running: dict[str, tuple[subprocess.Popen, float, Path]] = {}
    logs.mkdir(parents=True, exist_ok=True)

    def share(name: str, threads: int) -> None:
        (logs / f"{name}.threads").write_text(str(threads))

    try:
        while pending or running:
            ready = [s for s in pending if all(n in finished for n in s.needs)]
            while ready and len(running) < jobs:
                stage = ready.pop(0)
                pending.remove(stage)
                threads = cpus if not running and not ready else each
                for name in running:  # a newcomer: the others go back to their share
                    share(name, each)
                share(stage.name, threads)
                log = logs / f"{stage.name}.log"
                env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                       ThreadShare.ENV: str((logs / f"{stage.name}.threads").resolve())}
                print(f"[demo] {stage.name}: python {' '.join(stage.args)}  ({threads} thread{'s' * (threads > 1)}, "
                      f"log {log})", flush=True)
                with open(log, "w") as handle:
                    process = subprocess.Popen([sys.executable, *stage.args], cwd=ROOT, env=env, stdout=handle,
                                               stderr=subprocess.STDOUT)
                running[stage.name] = (process, time.perf_counter(), log)
            if not running:
                blocked = ", ".join(f"{s.name} (needs {list(s.needs)})" for s in pending)
                raise StageFailed(f"stages that can never start: {blocked}")
            time.sleep(poll_s)
            for name, (process, start, log) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[name]
                if process.returncode != 0 or not by_name[name].done.exists():
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                    why = f"exit code {process.returncode}" if process.returncode else f"no {by_name[name].done}"
                    raise StageFailed(f"stage {name} failed ({why}); the end of {log}:\n{tail}\n"
                                      f"Rerun to resume: finished stages are kept.")
                timings[name] = round(time.perf_counter() - start, 1)
                finished.add(name)
                print(f"[demo] {name}: {timings[name]} s", flush=True)
                if on_finish:
                    on_finish(name)
                if running and not any(all(n in finished for n in s.needs) for s in pending):
                    for other in running:  # nothing new can start: the survivors take the freed cores
                        share(other, max(1, cpus // len(running)))
    finally:
        for process, _, _ in running.values():
            process.terminate()
        for process, _, _ in running.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# Each profile's stage settings: overrides on top of the stage's config (conf/train.yaml, conf/attributes.yaml).
PROFILES = {
    # The default: recognisable pictures come first. The 64 px unclip-tiny CLIP (what makes the embeddings tell
    # shapes apart) and a decoder trained with min-SNR weighting, which learns shapes in half the steps of the
    # unweighted loss (conf/diffusion/cosine_v_min_snr.yaml). The AR prior uses 64 bins a component and a higher
    # learning rate: with 256 bins at 5e-4 it reached cos_true 0.73 in 400 steps, with these 0.85. CLIP hard negatives: captions one
    # attribute away (held-out zero-shot shape 0.65 -> 0.89), and images with one outline redrawn (grid single 0.74 -> 0.82, outlines)
    "full": {
        "root": "outputs",
        # wall time on 2 cores from a fresh clone with setup (README, "Demo") by bf16 unit (unclip.precision.bf16_unit)
        "expect": {"amx": "about 23 min", "avx512_bf16": "about 30 min", "32-true": "about 62 min"},
        "clip": ("model.module.model_name=unclip-tiny", "trainer.max_steps=600", "trainer.val_check_interval=300",
                 "data.batch_size=256", "optim.optimizer.lr=1e-3", "optim.warmup_steps=50",
                 "model.module.hard_negatives=true", "model.module.image_negatives=0.5"),
        # both sample with classifier-free guidance 3 by default (saved in their checkpoints, so sample.py draws
        # as the grid does): on the demo grid, right single / held-out 0.53 / 0.34 -> 0.63 / 0.45 (diffusion),
        # 0.39 / 0.28 -> 0.61 / 0.42 (AR); the contrastive prior gains nothing from it (README, A/B)
        # 1,200 steps (~2 min on one core beside the decoder): held-out right 0.38 -> 0.62 on the grid over 400
        "diffusion_prior": ("trainer.max_steps=1200", "trainer.val_check_interval=1200", "model.module.val_pool=250",
                            "sampler.guidance_scale=3"),
        "ar_prior": ("trainer.max_steps=400", "trainer.val_check_interval=400", "model.module.val_pool=250",
                     "model.module.tokenizer.bins=64", "optim.optimizer.lr=1e-3", "model.module.sampling.guidance_scale=3"),
        "contrastive_prior": ("trainer.max_steps=400", "trainer.val_check_interval=400", "model.module.val_pool=250"),
        # caption-conditioned too: decoding true z_i, held-out single shapes right 0.25 -> 0.40 (README, A/B); guidance
        # 3 (saved in its checkpoint): at 5 the grid draws more second objects (right, all rows, diffusion prior: 8 / 5 /
        # 3 / 2 -> 0.50 / 0.61 / 0.69 / 0.66); 3,600 steps: single right 0.77 -> 0.83 over 3,000 (README, A/B), ~3 min more
        "decoder": ("model.module.text_cond=true", "trainer.max_steps=3600", "trainer.val_check_interval=3600",
                    "trainer.limit_val_batches=4", "data.batch_size=32", "optim.optimizer.lr=1e-3",
                    "sampler.guidance_scale=3"),
        # samples with DDIM 8 (saved in its checkpoint): on 16-sample grids both judges read as at 16 (README, A/B)
        "upsampler": ("trainer.max_steps=300", "trainer.val_check_interval=300", "data.batch_size=32",
                      "optim.optimizer.lr=2e-3", "optim.warmup_steps=50", "trainer.limit_val_batches=1", "sampler.steps=8"),
        "attributes": (),
        # two-object prompts as conjunctions of their object phrases, each part guided near the cell it names: on the
        # grid, both objects right 0.05 -> 0.66 (README, A/B); one-object prompts get the size and cell they leave
        # open drawn first (unclip.completion): single-object right 0.66 -> 0.82, no second blob for "a red circle"
        "grids": {"compose": "object_phrases", "layout": True, "complete": "shapes"},
    },
    # `make demo-fast`: every stage small, for a quick look at the whole pipeline. The CLIP is unclip-tiny-32 (32 px
    # image tower, 64-wide text tower, ~4x cheaper a step than unclip-tiny), the priors are half as wide and deep
    # (the diffusion prior loses nothing by it at this length), and the decoder is short: colours and positions
    # come out, shapes need the full profile's CLIP and decoder.
    "fast": {
        "root": "outputs/fast",
        "expect": {"amx": "about 7 min", "avx512_bf16": "about 7 min", "32-true": "about 15 min"},
        "clip": ("trainer.max_steps=300", "trainer.val_check_interval=300", "data.batch_size=256",
                 "optim.optimizer.lr=1e-3", "optim.warmup_steps=30"),
        "diffusion_prior": ("trainer.max_steps=300", "trainer.val_check_interval=300", "model.module.val_pool=250",
                            "model.module.net.dim=128", "model.module.net.depth=2"),
        # 64 bins a component and a higher learning rate: 256 bins at 5e-4 were still near chance at 300 steps
        "ar_prior": ("trainer.max_steps=400", "trainer.val_check_interval=400", "model.module.val_pool=250",
                     "model.module.net.dim=128", "model.module.net.depth=2", "model.module.tokenizer.bins=64",
                     "optim.optimizer.lr=1e-3"),
        "contrastive_prior": ("trainer.max_steps=300", "trainer.val_check_interval=300", "model.module.val_pool=250",
                              "model.module.net.dim=128", "model.module.net.depth=2"),
        "decoder": ("model.module.text_cond=true", "trainer.max_steps=550", "trainer.val_check_interval=550",
                    "data.batch_size=32", "optim.optimizer.lr=1e-3", "trainer.limit_val_batches=1"),
        "upsampler": ("trainer.max_steps=80", "trainer.val_check_interval=80", "data.batch_size=32",
                      "optim.optimizer.lr=2e-3", "optim.warmup_steps=20", "trainer.limit_val_batches=1",
                      "model.module.val_images=8"),
        "attributes": ("train.epochs=3",),
        "grids": {"decoder_steps": 20, "upsampler_steps": 8, "compose": "object_phrases", "layout": True,
                  "complete": "shapes"},
    },
}


def stages(profile: dict, precision: str | None = None) -> list[Stage]:
    """The demo's stages, longest chain first: CLIP -> cache -> decoder decides the wall time, the rest runs
    beside it. Training stages publish to ROOT/artifacts/KIND/shapes.*, which marks them done; each trains
    in ``precision`` (``trainer.precision``) when one is given."""
    root = ROOT / profile["root"]
    data, artifacts = root / "data" / "shapes", root / "artifacts"
    paths = (f"paths.root={root}",)
    trainer = (f"trainer.precision={precision}",) if precision else ()

    def train(model: str, *overrides: str) -> tuple[str, ...]:
        return ("train.py", f"model={model}", *paths, *trainer, *overrides, *QUIET)

    def published(kind: str, suffix: str = ".ckpt") -> Path:
        return artifacts / kind / f"{PUBLISHED}{suffix}"

    cache = root / "cache" / "shapes" / "shapes_tiny" / "stats.npz"
    return [
        Stage("data", ("-m", "unclip.data.shapes", f"out={data}", "n=10000", "size=64", "shards=8"), data / "manifest.json"),
        Stage("clip", train("clip_pretrain", *profile["clip"]), published("clip", ".pt"), needs=("data",)),
        # token states cached too: the priors and the decoder then skip the text tower a step (~120 s of CPU)
        Stage("embed", ("embed.py", *paths, "progress=false", "token_states=true"), cache, needs=("clip",)),
        Stage("decoder", train("decoder", *profile["decoder"]), published("decoder"), needs=("embed",)),
        Stage("attributes", ("train_classifier.py", *paths, *profile["attributes"]), published("attributes", ".pt"),
              needs=("data",)),
        Stage("upsampler", train("upsampler_32_64", *profile["upsampler"]), published("upsampler"), needs=("data",)),
        Stage("diffusion_prior", train("diffusion_prior", *profile["diffusion_prior"]), published("diffusion_prior"),
              needs=("embed",)),
        Stage("ar_prior", train("ar_prior", *profile["ar_prior"]), published("ar_prior"),
              needs=("embed",)),
        Stage("contrastive_prior", train("contrastive_prior", *profile["contrastive_prior"]),
              published("contrastive_prior"), needs=("embed",)),
    ]


def trained_priors(plan: list[Stage]) -> list[str]:
    """The prior kinds the demo trains (a stage is named after its kind): each gets a grid."""
    import unclip.modules  # noqa: F401  (registers the built-in stage kinds)
    from unclip import registry

    return [s.name for s in plan if registry.is_prior(s.name)]

def parse_cli(argv: list[str]) -> tuple[str, int, str]:
    """``profile=full|fast``, ``jobs=N`` (stages side by side; default one per core, at most 2) and
    ``precision=auto|32-true|bf16-mixed`` (auto: bf16-mixed where bf16 matmuls are fast, see ``auto_precision``)."""
    profile, jobs, precision = "full", min(2, os.cpu_count() or 1), "auto"
    usage = (f"usage: python -m unclip.demo [profile={'|'.join(PROFILES)}] [jobs=N] "
             f"[precision={'|'.join(PRECISIONS)}]")
    for arg in argv:
        key, _, value = arg.partition("=")
        if key == "profile" and value in PROFILES:
            profile = value
        elif key == "jobs" and value.isdigit() and int(value) >= 1:
            jobs = int(value)
        elif key == "precision" and value in PRECISIONS:
            precision = value
        else:
            raise SystemExit(f"bad argument {arg!r}; {usage}")
    return profile, jobs, precision


def expectation(name: str, precision: str, unit: str | None = None) -> str:
    """How long the profile takes on 2 CPU cores in ``precision`` (bf16: on the CPU's bf16 ``unit``, this one's by
    default), and the quicker way where fp32 makes it long."""
    times = PROFILES[name]["expect"]
    unit = "32-true" if precision == "32-true" else unit or bf16_unit()
    if unit not in times:  # bf16 asked for on a CPU that emulates it
        return "no time measured here: this CPU emulates bf16 (~100x slower than precision=32-true without a GPU)"
    told = f"on 2 CPU cores{'' if unit == '32-true' else ' with ' + unit.upper().replace('_', '-')} it takes {times[unit]}"
    if precision == "32-true" and name != "fast":
        told += "; `make demo-fast` (profile=fast) is the quick look"
    return told


def check_profile(root: Path, name: str, plan: list[Stage]) -> None:
    """Refuses to mix profiles in one root: a stage another recipe finished would be skipped, and its grid
    reported under this profile's name. ``demo/profile.json`` records which profile the root belongs to."""
    stamp = root / "demo" / "profile.json"
    made_by = json.loads(stamp.read_text()).get("profile") if stamp.exists() else None
    finished = [s.name for s in plan if s.done.exists()]
    if made_by not in (None, name) or (made_by is None and set(finished) - {"data"}):
        raise StageFailed(f"{root} holds stages ({', '.join(finished)}) made by "
                          f"{'profile ' + made_by if made_by else 'something other than this demo'}, not profile {name}: "
                          f"move {root / 'artifacts'} away (or delete it) to rerun them, or run that profile")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"profile": name}))


def stop_on_sigterm() -> None:
    """A plain ``kill`` of the demo stops its stages too (SystemExit runs run_stages' cleanup), so no
    orphaned trainer keeps writing a run directory that a rerun would also write."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def flag(value: str) -> bool:
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(value)
    return value.lower() in ("true", "1")


GRID_SETTINGS = {"prior_guidance": float, "decoder_guidance": float, "prior_steps": int, "decoder_steps": int,
                 "upsampler_steps": int, "compose": str, "layout": flag, "rerank": int,
                 "complete": str}


def regrid(argv: list[str]) -> dict:
    """``python -m unclip.demo grids [profile=full] [samples=16] [prior_guidance=3] [decoder_guidance=5]
    [prior_steps=N] [decoder_steps=N] [upsampler_steps=N] [compose=object_phrases|none] [layout=true] [rerank=N] [complete=shapes|none] [priors=diffusion_prior,ar_prior]
    [decoder=decoder/NAME] [upsampler=upsampler/NAME] [precision=auto]``:
    the grids again from a finished demo's stages with other sampling settings and more samples per prompt
    (the A/Bs in the README), written with ``results.json`` (per row too) to ``DEMO/grids/<settings>/``."""
    from unclip.completion import COMPLETERS
    from unclip.composition import SPLITTERS

    named = {"compose": SPLITTERS, "complete": COMPLETERS}  # settings that name a function, or none to turn it off
    name, samples, precision, settings, priors = "full", 16, "auto", {}, None
    decoder, upsampler = demo_stage("decoder"), demo_stage("upsampler")
    usage = (f"usage: python -m unclip.demo grids [profile={'|'.join(PROFILES)}] [samples=N] [priors=KIND,...] "
             f"[decoder=decoder/NAME] [upsampler=upsampler/NAME] [precision={'|'.join(PRECISIONS)}] [{'] ['.join(f'{k}=...' for k in GRID_SETTINGS)}]")
    for arg in argv:
        key, _, value = arg.partition("=")
        try:
            if key == "profile" and value in PROFILES:
                name = value
            elif key == "samples" and int(value) > 0:
                samples = int(value)
            elif key == "precision" and value in PRECISIONS:
                precision = value
            elif key == "priors" and value:
                priors = value.split(",")
            elif key == "decoder" and value:
                decoder = value
            elif key == "upsampler" and value:
                upsampler = value
            elif key in named and value == "none":
                settings[key] = None
                if key == "compose":  # no parts, nothing to place
                    settings["layout"] = False
            elif key in GRID_SETTINGS and (key not in named or value in named[key]):
                settings[key] = GRID_SETTINGS[key](value)
            else:
                raise ValueError
        except ValueError:
            raise SystemExit(f"bad argument {arg!r}; {usage}") from None
    profile = PROFILES[name]
    root = ROOT / profile["root"]
    plan = stages(profile)
    missing = [s.name for s in plan if not s.done.exists()]
    if missing:
        raise SystemExit(f"[demo] grids need a finished demo; missing stages: {', '.join(missing)} (run make demo)")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    settings = {**profile["grids"], **settings}
    parts = [f"{k}{v:g}" if isinstance(v, (int, float)) else f"{k}-{v}" for k, v in sorted(settings.items())] + [s.replace("/", "-") for s in (decoder, upsampler) if s not in (demo_stage("decoder"), demo_stage("upsampler"))]
    tag = "_".join(parts) or "defaults"
    out = root / "demo" / "grids" / f"n{samples}_{tag}"
    precision = auto_precision() if precision == "auto" else precision
    results = sample_grids(root, {}, priors or trained_priors(plan), precision, samples, out, decoder, upsampler, **settings)
    (out / "results.json").write_text(json.dumps({"profile": name, "samples": samples, "settings": settings, **results},
                                                 indent=1))
    for prior, scores in results.items():
        for row in scores["rows"]:
            print(f"[demo] {prior}: {row['prompt']}: right {row['right']:.2f} (outlines {row['outline_right']:.2f}), "
                  f"named number of objects {row['count']:.2f}")
    print(f"[demo] {out / 'results.json'}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["grids"]:
        regrid(argv[1:])
        return
    name, jobs, precision = parse_cli(argv)
    stop_on_sigterm()
    profile = PROFILES[name]
    root = ROOT / profile["root"]
    demo = root / "demo"
    precision = auto_precision() if precision == "auto" else precision
    print(f"[demo] profile {name}, training and sampling in {precision}; {expectation(name, precision)}", flush=True)
    plan = stages(profile, precision)
    check_profile(root, name, plan)
    timings_path = demo / "timings.json"
    timings: dict[str, float] = {}  # this run's only: stages finished in an earlier run are not timed again

    def save(_stage: str | None = None) -> None:
        timings_path.write_text(json.dumps(timings, indent=1))

    total = time.perf_counter()
    run_stages(plan, jobs, demo / "logs", timings, on_finish=save)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    results = sample_grids(root, timings, trained_priors(plan), precision, **profile["grids"])
    timings["total_this_run"] = round(time.perf_counter() - total, 1)
    save()
    (demo / "results.json").write_text(json.dumps({"profile": name, **results}, indent=1))
    print(f"[demo] grids: {', '.join(r['grid'] for r in results.values())} (rows: {demo / 'prompts.txt'}); "
          f"this run {timings['total_this_run']:.0f} s; stage times (s) {timings}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except StageFailed as error:
        raise SystemExit(f"[demo] {error}") from None
