"""``make demo``: every stage at demo size on the built-in shapes data, each skipped once finished.

Stages run as the user would run them (``python -m unclip.data.shapes``, ``python train.py``,
``python -m unclip.embed``), so an interrupted demo resumes: data and cache shards are written atomically
and training resumes from its run directory's ``last.ckpt``. Timings go to ``outputs/demo/timings.json``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = Path("outputs")
DEMO = OUT / "demo"

# Demo-size training runs: the stage's overrides on top of conf/train.yaml.
CLIP_RUN = ["model=clip_pretrain", "run.name=demo", "trainer.max_steps=600", "trainer.val_check_interval=300",
            "data.batch_size=256", "optim.optimizer.lr=1e-3", "trainer.enable_progress_bar=false", "optim.warmup_steps=50"]

PROMPTS = ["a red circle", "a large blue square", "a small yellow star in the top left", "a green triangle",
           "a purple hexagon in the center", "an orange diamond at the bottom", "a pink star", "a cyan disc"]


def run(stage: str, args: list[str], done: Path, timings: dict) -> None:
    if done.exists():
        print(f"[demo] {stage}: done already ({done})")
        return
    print(f"[demo] {stage}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    timings[stage] = round(time.perf_counter() - start, 1)
    print(f"[demo] {stage}: {timings[stage]} s", flush=True)


def retrieval_grid(path: Path, k: int = 8) -> None:
    """Each row: a prompt and the k val images the pretrained CLIP ranks highest for it."""
    import torch
    import torchvision

    from unclip.clip import FrozenCLIP
    from unclip.data.datamodule import CaptionImageDataModule

    clip = FrozenCLIP(pretrained=str(OUT / "artifacts" / "clip" / "shapes.pt"))
    data = CaptionImageDataModule(train=str(OUT / "data" / "shapes" / "val-*.tar"), fields=["image", "caption"],
                                  batch_size=500, image_size=64, shuffle=False)
    data.setup()
    data.datasets["train"].drop_last = False
    images = torch.cat([b["image"] for b in data.train_dataloader()])
    z_img = clip.encode_image(images)
    z_txt = clip.encode_text(PROMPTS).z_txt
    best = (z_txt @ z_img.T).topk(k, dim=-1).indices  # (prompts, k)
    grid = torchvision.utils.make_grid((images[best.flatten()] + 1) / 2, nrow=k, padding=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image(grid, path)
    (path.with_suffix(".txt")).write_text("\n".join(f"row {i}: {p}" for i, p in enumerate(PROMPTS)) + "\n")


def main() -> None:
    DEMO.mkdir(parents=True, exist_ok=True)
    timings_path = DEMO / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    total = time.perf_counter()
    data = OUT / "data" / "shapes"
    run("data", ["-m", "unclip.data.shapes", f"out={data}", "n=10000", "size=64", "shards=8"], data / "manifest.json", timings)
    run("clip", ["train.py", *CLIP_RUN], OUT / "artifacts" / "clip" / "shapes.pt", timings)
    run("embed", ["-m", "unclip.embed", "progress=false"], OUT / "cache" / "shapes" / "shapes_tiny" / "stats.npz", timings)
    grid = DEMO / "clip_retrieval.png"
    start = time.perf_counter()
    retrieval_grid(grid)
    timings["retrieval_grid"] = round(time.perf_counter() - start, 1)
    timings_path.write_text(json.dumps(timings, indent=1))
    print(f"[demo] wrote {grid} (rows: {DEMO / 'clip_retrieval.txt'}); this run {time.perf_counter() - total:.0f} s; "
          f"stage times {timings}")


if __name__ == "__main__":
    main()
