"""Figures of the evaluation modes (matplotlib, Agg): prior metrics against cost and steps, image quality
against steps, and prior grids side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from unclip import registry
from unclip.eval.prior_metrics import BASELINES

# the plotted ones: closeness to the true z_i, and (lower is better) how image-like the spread of ẑ_i is
COST_METRICS = ("cos_true", "fd_img", "cos_true_unseen", "fd_img_unseen")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def trained_kinds(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["prior"] for r in rows if r["prior"] not in BASELINES))


def shade(plt, kind: str, i: int, count: int):
    """Colour ``i`` of ``count`` in the prior kind's own hue (darker = later)."""
    return plt.get_cmap(registry.colormap(kind))(0.45 + 0.5 * (i / max(count - 1, 1)))


def draw_baselines(ax, rows: list[dict], metric: str) -> None:
    for r in rows:
        if r["prior"] in BASELINES and r.get(metric) is not None:
            ax.axhline(r[metric], linestyle="--", linewidth=1, color="grey")
            ax.annotate(r["prior"], (0.01, r[metric]), xycoords=("axes fraction", "data"), fontsize=6, color="grey")


def curves(rows: list[dict], kind: str) -> list[tuple[str, list[dict]]]:
    """A prior's sweep as curves: one per guidance scale over steps where it has steps, else one over
    guidance scales."""
    points = [r for r in rows if r["prior"] == kind]
    if any(r.get("steps") is not None for r in points):
        scales = list(dict.fromkeys(r["guidance_scale"] for r in points))
        return [(f"{kind} guidance {g if g is not None else 'default'}",
                 sorted((r for r in points if r["guidance_scale"] == g), key=lambda r: r.get("steps") or 0)) for g in scales]
    return [(kind, sorted(points, key=lambda r: r.get("guidance_scale") or 0))]


def metric_panels(rows: list[dict], path: Path, title: str, xlabel: str, draw_kind: Callable, **xscale) -> None:
    """One panel per :data:`COST_METRICS` entry: ``draw_kind(plt, ax, metric, kind)`` draws each trained
    prior, the baselines are dashed lines, the x axis is logarithmic (``xscale`` options)."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, metric in zip(axes.flat, COST_METRICS):
        for kind in trained_kinds(rows):
            draw_kind(plt, ax, metric, kind)
        draw_baselines(ax, rows, metric)
        ax.set_xscale("log", **xscale)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric + (" (lower is better)" if metric.startswith("fd_") else ""))
    axes.flat[0].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(rows: list[dict], path: Path) -> None:
    """Each prior metric against ms per sample (log x): a curve per guidance scale over steps (diffusion,
    points labelled by steps) or over guidance scales (the others, labelled g=...); baselines dashed."""
    def draw(plt, ax, metric, kind):
        lines = curves(rows, kind)
        for i, (name, line) in enumerate(lines):
            ax.plot([r["ms_per_sample"] for r in line], [r[metric] for r in line], "o-", markersize=3, linewidth=1,
                    color=shade(plt, kind, i, len(lines)), label=name)
            for r in line:
                tag = r["steps"] if r.get("steps") is not None else f"g={r.get('guidance_scale')}"
                ax.annotate(str(tag), (r["ms_per_sample"], r[metric]), fontsize=5, textcoords="offset points", xytext=(2, 2))

    metric_panels(rows, path, "prior metrics against sampling cost", "ms per sample (prior only; labels: steps or guidance)", draw)


def plot_steps(rows: list[dict], path: Path) -> None:
    """Each prior metric against sampling steps: one line per (prior, guidance scale) that has steps; a
    prior without steps as a dotted line at its image setting, baselines dashed."""
    def draw(plt, ax, metric, kind):
        lines = [(name, [r for r in line if r.get("steps") is not None]) for name, line in curves(rows, kind)]
        lines = [(name, line) for name, line in lines if line]
        if not lines:
            chosen = next(r for r in rows if r["prior"] == kind and r["image_setting"])
            ax.axhline(chosen[metric], linestyle=":", linewidth=1.5, color=shade(plt, kind, 1, 1),
                       label=f"{kind} ({chosen['settings']})")
        for i, (name, line) in enumerate(lines):
            ax.plot([r["steps"] for r in line], [r[metric] for r in line], "o-", markersize=3,
                    color=shade(plt, kind, i, len(lines)), label=name)

    metric_panels(rows, path, "prior metrics against sampling steps", "prior sampling steps", draw, base=2)


def grid_image(pixels: torch.Tensor, per_row: int) -> torch.Tensor:
    from torchvision.utils import make_grid

    return make_grid(pixels.add(1).div(2).clamp(0, 1).cpu(), nrow=per_row, padding=2, pad_value=1.0).permute(1, 2, 0)


def grids_figure(grids: dict[str, torch.Tensor], prompts: list[str], per_row: int, path: Path) -> None:
    """Side by side, one column block per prior: the same prompts (rows) and seeds in every block."""
    plt = pyplot()
    blocks = list(grids.items())
    fig, axes = plt.subplots(1, len(blocks), figsize=(1.6 + 0.55 * per_row * len(blocks), 0.6 + 0.55 * len(prompts)),
                             squeeze=False)
    for ax, (kind, pixels) in zip(axes[0], blocks):
        image = grid_image(pixels, per_row)
        ax.imshow(image.numpy(), interpolation="nearest")
        ax.set_title(kind, fontsize=8)
        ax.set_xticks([])
        rows = len(prompts)
        ax.set_yticks([(i + 0.5) * image.shape[0] / rows for i in range(rows)])
        ax.set_yticklabels(prompts if ax is axes[0][0] else [""] * rows, fontsize=6)
        ax.tick_params(length=0)
    fig.tight_layout()
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)


def plot_quality_vs_steps(rows: list[dict], path: Path) -> None:
    """Two panels, attribute accuracy and CLIP score against steps (log x): the prior's DDIM steps, the
    decoder's DDIM steps, and DDPM on the full chain as its own marker; latency annotated at each point."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"prior": "o-", "decoder": "s-"}
    series = [(sweep, sampler, f"{sweep} {sampler} steps ({'decoder' if sweep == 'prior' else 'prior'} fixed)", styles[sweep])
              for sweep, sampler in dict.fromkeys((r["sweep"], r["sampler"]) for r in rows) if sampler != "ddpm"]
    series += [("decoder", "ddpm", "decoder DDPM, full chain", "D")]
    for ax, metric in zip(axes, ("attr_acc", "clip_score")):
        for sweep, sampler, name, style in series:
            points = sorted((r for r in rows if r["sweep"] == sweep and r["sampler"] == sampler), key=lambda r: r["steps"])
            if not points:
                continue
            ax.plot([r["steps"] for r in points], [r[metric] for r in points], style, markersize=4, label=name)
            for r in points:
                ax.annotate(f"{r['ms_per_image']:.0f} ms", (r["steps"], r[metric]), fontsize=6,
                            textcoords="offset points", xytext=(3, 3))
        ax.set_xscale("log")
        ax.set_xlabel("sampling steps (annotations: ms per image, prior + decoder)")
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=7)
    fig.suptitle("image quality against sampling steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_compare(rows: list[dict], path: Path) -> None:
    """cos_true against seconds per 1,000 samples, one point per prior and setting; baselines dashed."""
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["prior"] for r in rows if not r["prior"].startswith("baseline")):
        points = [r for r in rows if r["prior"] == kind]
        ax.scatter([r["s_per_1k"] for r in points], [r["cos_true"] for r in points], label=kind)
        for r in points:
            ax.annotate(r["settings"], (r["s_per_1k"], r["cos_true"]), fontsize=6)
    for r in rows:
        if r["prior"].startswith("baseline"):
            ax.axhline(r["cos_true"], linestyle="--", linewidth=1, color="grey")
            ax.annotate(r["prior"], (0, r["cos_true"]), fontsize=7, color="grey")
    ax.set_xlabel("seconds per 1,000 samples")
    ax.set_ylabel("val cos(ẑ_i, z_i)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
