"""The demo's grids: the prompts (single-object, held-out compositions, two-object scenes), sampling them
through each prior, scoring them with the attribute classifier, and ``python -m unclip.demo grids``, which
samples them again from a finished demo with other settings (the README's A/Bs; the command is in unclip.demo)."""

from __future__ import annotations

import time
from pathlib import Path

# Each prompt names what the attribute classifier checks in the samples, in three marked groups: compositions
# training shows, held-out [shape, colour] pairs that no training image shows (shapes.DEFAULT_HOLDOUT), and
# two-object scenes in training's pair phrasing.
PROMPTS = {
    "single": [
        ("a red circle", [{"shape": "circle", "color": "red"}]),
        ("a large blue square", [{"shape": "square", "color": "blue", "size": "large"}]),
        ("a yellow star in the top left", [{"shape": "star", "color": "yellow", "position": "top left"}]),
        ("an orange triangle", [{"shape": "triangle", "color": "orange"}]),
        ("a purple hexagon in the center", [{"shape": "hexagon", "color": "purple", "position": "center"}]),
        ("a cyan diamond at the bottom", [{"shape": "diamond", "color": "cyan", "position": "bottom"}]),
        ("a pink star", [{"shape": "star", "color": "pink"}]),
        ("a large green circle", [{"shape": "circle", "color": "green", "size": "large"}]),
    ],
    "held-out": [
        ("a green star", [{"shape": "star", "color": "green"}]),
        ("a purple circle", [{"shape": "circle", "color": "purple"}]),
        ("a large cyan triangle", [{"shape": "triangle", "color": "cyan", "size": "large"}]),
        ("a pink square in the center", [{"shape": "square", "color": "pink", "position": "center"}]),
    ],
    "two": [
        ("a large red circle in the left and a large blue square in the right",
         [{"shape": "circle", "color": "red", "size": "large", "position": "left"},
          {"shape": "square", "color": "blue", "size": "large", "position": "right"}]),
        ("a large yellow star in the top left and a large green triangle in the bottom right",
         [{"shape": "star", "color": "yellow", "size": "large", "position": "top left"},
          {"shape": "triangle", "color": "green", "size": "large", "position": "bottom right"}]),
        ("a medium orange hexagon in the top, next to a medium cyan circle in the bottom",
         [{"shape": "hexagon", "color": "orange", "size": "medium", "position": "top"},
          {"shape": "circle", "color": "cyan", "size": "medium", "position": "bottom"}]),
        ("a large purple diamond in the left and a large pink star in the right",
         [{"shape": "diamond", "color": "purple", "size": "large", "position": "left"},
          {"shape": "star", "color": "pink", "size": "large", "position": "right"}]),
    ],
}
SAMPLES_PER_PROMPT = 8


def grid_rows() -> list[tuple[str, str, list[dict]]]:
    """(group, prompt, objects) of every grid row, top to bottom."""
    return [(group, prompt, objects) for group, rows in PROMPTS.items() for prompt, objects in rows]


def score_grid(classifier, pixels, rows: list[tuple[str, str, list[dict]]], n: int) -> dict:
    """The grid's attribute accuracies overall and per group; ``right``: every named object has its shape
    and colour and the image holds no object the prompt did not ask for (a second blob is wrong).
    ``outline_right``: the same rule read by the outline reader (unclip.eval.outlines), which has no weights."""
    from unclip.eval.attributes import predict, score_predictions
    from unclip.eval.breakdown import count_hits
    from unclip.eval.outlines import is_right, read_images

    labels = [objects for _, _, objects in rows for _ in range(n)]
    groups = [group for group, _, _ in rows for _ in range(n)]
    pred = predict(classifier, pixels)
    scores = score_predictions(pred, labels)
    exact = count_hits(pred, labels)
    per_image = [score_predictions(pred.subset([i]), [labels[i]])["attr_prompt"] == 1.0 and exact[i] for i in range(len(labels))]
    outlines = [is_right(read, asked) for read, asked in zip(read_images(pixels), labels)]
    scores["right"] = sum(per_image) / len(per_image)
    scores["outline_right"] = sum(outlines) / len(outlines)
    scores["rows"] = [{"prompt": prompt, "right": sum(per_image[r * n:(r + 1) * n]) / n,
                       "outline_right": sum(outlines[r * n:(r + 1) * n]) / n,
                       "count": sum(exact[r * n:(r + 1) * n]) / n} for r, (_, prompt, _) in enumerate(rows)]
    for group in PROMPTS:
        index = [i for i, g in enumerate(groups) if g == group]
        scores[f"attr_acc_{group}"] = score_predictions(pred.subset(index), [labels[i] for i in index])["attr_acc"]
        scores[f"right_{group}"] = sum(per_image[i] for i in index) / len(index)
        scores[f"outline_right_{group}"] = sum(outlines[i] for i in index) / len(index)
    return scores


PUBLISHED = "shapes"  # the name every demo stage publishes under: ARTIFACTS/KIND/shapes.*


def demo_stage(kind: str) -> str:
    """The demo's own stage of ``kind`` (``KIND/shapes``): named, because a stage published beside it for an
    A/B (``KIND/NAME``) makes the bare kind ambiguous."""
    return f"{kind}/{PUBLISHED}"


def generate_options(settings: dict) -> dict:
    """The grid's sampling settings as ``generate`` takes them: ``compose`` (a splitter's name, or none) made the
    prompt splitter (no layout without one), ``complete`` (a completer's name, or none) the prompt completer."""
    from unclip.completion import completer_named
    from unclip.composition import splitter_named

    options = dict(settings)
    if options.get("compose"):
        options["compose"] = splitter_named(options["compose"])
    else:
        options.pop("compose", None)
        options.pop("layout", None)
    if options.get("complete"):
        options["complete"] = completer_named(options["complete"])
    else:
        options.pop("complete", None)
    return options


def sample_grids(root: Path, timings: dict, priors: list[str], precision: str = "32-true", samples: int = SAMPLES_PER_PROMPT,
                 out: Path | None = None, decoder: str = demo_stage("decoder"), upsampler: str = demo_stage("upsampler"),
                 **settings) -> dict:
    """For each prior: prompts × samples through the pipeline, a PNG grid with each row marked by its group
    (in ``out``, default ROOT/demo), the attribute accuracy per group and each row's share of right samples."""
    import torch

    from unclip.eval.attributes import load_classifier
    from unclip.pipeline import UnCLIPPipeline
    from unclip.sampling import save_grid

    artifacts, demo = root / "artifacts", out or root / "demo"
    demo.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(artifacts / "attributes" / f"{PUBLISHED}.pt")
    # the demo's own upsampler where the demo trained one; one named for an A/B must exist
    own = upsampler == demo_stage("upsampler")
    upsamplers = [upsampler] if not own or (artifacts / "upsampler" / f"{PUBLISHED}.ckpt").exists() else []
    rows = grid_rows()
    prompts = [prompt for _, prompt, _ in rows]
    marks = [f"{group}: {prompt}" for group, prompt, _ in rows]
    results = {}
    for prior in priors:
        start = time.perf_counter()
        pipe = UnCLIPPipeline.from_checkpoints(decoder=decoder, prior=demo_stage(prior), upsamplers=upsamplers, artifacts=artifacts,
                                               device="auto", precision=precision)
        with torch.no_grad():
            drawn = pipe.generate(prompts, n=samples, seed=0, **generate_options(settings))
        grid = save_grid(drawn.pixels, samples, demo / f"grid_{prior}.png", row_labels=marks)
        scores = score_grid(classifier, drawn.pixels, rows, samples)
        per_row = scores.pop("rows")
        summary = {"grid": str(grid), **{k: round(float(v), 4) for k, v in scores.items()}}
        results[prior] = {**summary, "rows": per_row}
        timings[f"grid_{prior}"] = round(time.perf_counter() - start, 1)
        print(f"[demo] {grid}: {summary}", flush=True)
    (demo / "prompts.txt").write_text("\n".join(f"row {i}: {m}" for i, m in enumerate(marks)) + "\n")
    return results
