"""Sampling latency against the number of steps, with the image quality each step count buys (the
DDIM-50 against DDPM-1000 trade-off), on the published demo stages (``make demo``): prior DDIM steps at
a fixed decoder, then decoder DDIM steps and ancestral DDPM over the whole chain at a fixed prior.
Quality is the attribute classifier's accuracy and the CLIP score on a slice of the prompt suite, through
:func:`unclip.eval.steps.steps_sweep` (``python evaluate.py mode=steps`` runs the full version).
"""

from __future__ import annotations

from pathlib import Path

import torch

ARTIFACTS = Path("outputs/artifacts")
NEEDED = [ARTIFACTS / "decoder" / "shapes.ckpt", ARTIFACTS / "diffusion_prior" / "shapes.ckpt",
          ARTIFACTS / "attributes" / "shapes.pt"]
PLOT = Path(__file__).parent / "sampling.png"


def rows(prompts: int = 16, prior_steps=(8, 16, 64), decoder_steps=(10, 25, 50)) -> list[tuple[str, str, str]]:
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        return [("sampling latency vs steps", "not measured", f"needs the demo's stages ({', '.join(missing)}): run `make demo`")]
    from unclip.eval.attributes import load_classifier
    from unclip.eval.prompt_suites import suite_entries
    from unclip.eval.steps import steps_sweep
    from unclip.eval.plots import plot_quality_vs_steps
    from unclip.pipeline import UnCLIPPipeline

    pipe = UnCLIPPipeline.from_checkpoints(decoder="decoder", prior="diffusion", artifacts=ARTIFACTS)
    entries = suite_entries("v1", prompts)
    with torch.no_grad():
        sweep = steps_sweep(pipe, entries, n=1, seed=0, classifier=load_classifier(NEEDED[2]), prior_steps=prior_steps,
                            decoder_steps=decoder_steps, decoder_ddpm=True, batch_size=prompts)
    plot_quality_vs_steps(sweep, PLOT)
    out = []
    for r in sweep:
        stage = "prior" if r["sweep"] == "prior" else "decoder"
        ms = r["ms_prior"] if stage == "prior" else r["ms_decode"]
        out.append((f"sampling: {stage} {r['sampler'].upper()} {r['steps']} steps ({pipe.image_size} px, batch {prompts})",
                    f"{ms:,.1f} ms/image", f"attr_acc {r['attr_acc']:.2f}, CLIP score {r['clip_score']:.1f} "
                    f"({'decoder at its default' if stage == 'prior' else 'prior at its default'})"))
    return out
