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
# end to end (prior + decoder + upsampler): the defaults before the fast-sampling work against today's
OLD_DEFAULTS = {"precision": "32-true", "prior": {"steps": 64}, "decoder": {"steps": 50, "upsampler_steps": 16}, "nchw": True}
NEW_DEFAULTS = {"precision": "auto", "prior": {}, "decoder": {}}
NEW_STEPS_FP32 = {"precision": "32-true", "prior": {}, "decoder": {}}  # what the steps alone buy
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


def defaults_rows(prompts: int = 128, settings: tuple = (("old defaults", OLD_DEFAULTS), ("new steps in fp32", NEW_STEPS_FP32),
                                                    ("new defaults", NEW_DEFAULTS))) -> list[tuple[str, str, str]]:
    """Latency per image end to end, prior + decoder + the demo's upsampler, and the quality it buys, at the
    old defaults and the new (each stage's own sampler and steps, precision auto), the same prompts and seeds."""
    missing = [str(p) for p in NEEDED if not p.exists()]
    if missing:
        return [("sampling end to end", "not measured", f"needs the demo's stages ({', '.join(missing)}): run `make demo`")]
    from unclip.eval.attributes import load_classifier
    from unclip.eval.images import evaluate_images
    from unclip.eval.prompt_suites import suite_entries
    from unclip.pipeline import UnCLIPPipeline
    from unclip.precision import resolve_precision

    upsamplers = ["upsampler"] if (ARTIFACTS / "upsampler" / "shapes.ckpt").exists() else []
    classifier, entries = load_classifier(NEEDED[2]), suite_entries("v1", prompts)
    measured = []
    for name, setting in settings:
        pipe = UnCLIPPipeline.from_checkpoints(decoder="decoder", prior="diffusion", upsamplers=upsamplers, artifacts=ARTIFACTS,
                                               precision=setting["precision"])
        if setting.get("nchw"):  # as the pipeline sampled before its UNets went channels_last
            for stage in (pipe.decoder, *pipe.upsamplers):
                stage.net.config.channels_last = False
                stage.net.to(memory_format=torch.contiguous_format)
        with torch.no_grad():
            evaluate_images(pipe, entries[:8], 1, 1, classifier, None, setting["prior"], setting["decoder"], 8)  # warm-up
            metrics = evaluate_images(pipe, entries, 1, 0, classifier, None, setting["prior"], setting["decoder"], 64)
        measured.append((name, setting, resolve_precision(setting["precision"]), metrics))
    base = measured[0][3]["ms_per_image"]
    out = []
    for name, setting, precision, m in measured:
        layout = "NCHW" if setting.get("nchw") else "channels_last"
        what = (f"sampling end to end, {name} (prior {setting['prior'] or 'its default'}, decoder {setting['decoder'] or 'its default'}, "
                f"{precision}, {layout}, {pipe.image_size} px, batch 64)")
        out.append((what, f"{m['ms_per_image']:,.1f} ms/image",
                    f"{base / m['ms_per_image']:.2f}x the old defaults; attr_acc {m['attr_acc']:.2f}, CLIP score {m['clip_score']:.1f} "
                    f"({prompts} suite prompts, one seed)"))
    return out
