"""kind=dalle2_pytorch_prior against DALLE2-pytorch itself, in two halves (the peer venv has DALLE2-pytorch and
not unclip's dependencies; unclip's venv the reverse):

    bench/.venv-peer/bin/python bench/check_laion_prior.py peer OUT      # DALLE2-pytorch writes OUT/VARIANT/
    .venv/bin/python bench/check_laion_prior.py compare OUT              # unclip converts each and compares

The peer half builds tiny random DiffusionPriorNetwork/DiffusionPrior (every weight random, gains included),
saves the state dict as ``best.pth``, its config as ``prior_config.json`` (TrainDiffusionPriorConfig's
``prior`` block) and ``reference.pt``: fixed inputs and DALLE2-pytorch's outputs (the net with and without
its null branch, ``forward_with_cond_scale``, one guided ``p_sample`` step per timestep row with its noise,
and a whole guided ``p_sample_loop`` from a seed). The compare half prints the max abs differences and
exits non-zero past ``TOLERANCE``. ``tests/fixtures/laion_prior/`` is the ``fixture`` variant's folder.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TOLERANCE = 1e-5
BATCH, TEXT_LEN, COND_SCALE, SEED = 3, 6, 3.0, 1234
VARIANTS = {
    # small enough for a test fixture: learned time embedding, cosine, x0, extra text/time tokens, NormFormer
    "fixture": {"net": dict(dim=16, depth=2, dim_head=8, heads=2, ff_mult=2, num_timesteps=32, num_time_embeds=2,
                            num_image_embeds=1, num_text_embeds=2, max_text_len=5, normformer=True),
                "prior": dict(image_embed_dim=16, image_size=64, timesteps=32, cond_drop_prob=0.2, loss_type="l2",
                              predict_x_start=True, beta_schedule="cosine", condition_on_text_encodings=True)},
    # the other branches: continuous time MLP, linear schedule, eps prediction (x0 clamped), no rotary, norm_in
    "continuous_eps": {"net": dict(dim=32, depth=2, dim_head=16, heads=4, ff_mult=1, num_timesteps=None,
                                   num_image_embeds=2, max_text_len=8, rotary_emb=False, norm_in=True, final_proj=False),
                       "prior": dict(image_embed_dim=32, image_size=64, timesteps=50, cond_drop_prob=0.1,
                                     predict_x_start=False, beta_schedule="linear", condition_on_text_encodings=True)},
    # LAION's layout at a small size: dim_head 64 (rotary on 32 of its features), quadratic schedule
    "laion_like": {"net": dict(dim=64, depth=3, dim_head=64, heads=2, ff_mult=4, num_timesteps=40, max_text_len=10,
                               normformer=True, attn_dropout=0.05, ff_dropout=0.05),
                   "prior": dict(image_embed_dim=64, image_size=224, timesteps=40, cond_drop_prob=0.1,
                                 predict_x_start=True, beta_schedule="quadratic", condition_on_text_encodings=True)},
}


def text_inputs(torch, dim: int):
    """z_t (B, dim) unit norm; token states (B, TEXT_LEN, dim), zero past each caption's length, as
    DALLE2-pytorch's CLIP adapters hand them over; the last caption longer than small max_text_len."""
    text_embed = torch.nn.functional.normalize(torch.randn(BATCH, dim), dim=-1)
    encodings = torch.randn(BATCH, TEXT_LEN, dim)
    for row, length in enumerate((2, 4, TEXT_LEN)):
        encodings[row, length:] = 0
    return text_embed, encodings


# -------------------------------------------------------------------------------------- peer half
def peer(out: Path) -> None:
    import torch
    from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork

    for name, variant in VARIANTS.items():
        torch.manual_seed(0)
        net = DiffusionPriorNetwork(**variant["net"])
        prior = DiffusionPrior(net=net, **variant["prior"]).eval()
        with torch.no_grad():  # gains and the null key/value away from their initial ones, so a wrong name shows
            for pname, p in net.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if pname.endswith(".g") else 0.05))
        dim, steps = variant["net"]["dim"], variant["prior"]["timesteps"]
        text_embed, encodings = text_inputs(torch, dim)
        x = torch.randn(BATCH, dim) * 2
        t = torch.tensor([steps - 1, steps // 2, 0])
        cond = {"text_embed": text_embed, "text_encodings": encodings}
        with torch.no_grad():
            ref = {"x": x, "t": t, "text_embed": text_embed, "text_encodings": encodings,
                   "net": net(x, t, **cond), "net_null": net(x, t, **cond, text_cond_drop_prob=1.0, image_cond_drop_prob=1.0),
                   "net_guided": net.forward_with_cond_scale(x, t, **cond, cond_scale=COND_SCALE)}
            torch.manual_seed(SEED)
            ref["step_noise"] = torch.randn_like(x)
            torch.manual_seed(SEED)
            ref["step"], _ = prior.p_sample(x, t, text_cond=cond, cond_scale=COND_SCALE)
            torch.manual_seed(SEED)  # the loop draws z_T, then one noise per step: unclip's sampler from the same seed
            ref["sample"] = prior.p_sample_loop((BATCH, dim), text_cond=cond, cond_scale=COND_SCALE)
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(prior.state_dict(), folder / "best.pth")
        torch.save(ref, folder / "reference.pt")
        config = {"prior": {**variant["prior"], "net": variant["net"]}}
        (folder / "prior_config.json").write_text(json.dumps(config, indent=1))
        print(f"wrote {folder}")


# ------------------------------------------------------------------------------------ unclip half
def register_clip(dim: int, context: int) -> str:
    """An open_clip config whose sizes fit the tiny prior (its weights are never used by the comparison)."""
    import tempfile

    import open_clip

    name = f"dalle2-check-{dim}"
    config = {"embed_dim": dim, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
              "text_cfg": {"context_length": context, "vocab_size": 49408, "width": dim, "heads": 2, "layers": 1}}
    with tempfile.TemporaryDirectory() as folder:  # open_clip reads the config as it is added, and keeps it
        path = Path(folder) / f"{name}.json"
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    return name


def compare_folder(folder: Path, out: Path | None = None) -> dict[str, float]:
    """Max abs differences between the converted stage and DALLE2-pytorch's recorded outputs."""
    import tempfile

    import torch
    import torch.nn.functional as F

    from unclip.convert import convert
    from unclip.diffusion import classifier_free_guidance, ddpm_step
    from unclip.loading import load

    if out is None:  # the converted stage only lives for the comparison
        with tempfile.TemporaryDirectory() as tmp:
            return compare_folder(folder, Path(tmp) / "stage.ckpt")
    ref = torch.load(folder / "reference.pt", weights_only=True)
    dim = ref["x"].shape[1]
    name = register_clip(dim, TEXT_LEN + 2)
    module = load(convert("dalle2_pytorch_prior", folder, out, clip_model=name, clip_pretrained="none"))
    net = module.net
    mask = (ref["text_encodings"] != 0).any(-1)
    x, t, z_txt, tokens = ref["x"], ref["t"], ref["text_embed"], ref["text_encodings"]
    every = torch.ones(len(x), dtype=torch.bool)
    pair = net.cat_prefix(net.encode_prefix(z_txt, tokens, mask), net.encode_prefix(z_txt, tokens, mask, every))
    guided = classifier_free_guidance(lambda x2, t2: net.denoise(pair, x2, t2), COND_SCALE)
    with torch.no_grad():
        ours = {"net": net(x, t, z_txt, tokens, mask), "net_null": net(x, t, z_txt, tokens, mask, every),
                "net_guided": guided(x, t)}
        ours["step"], _ = ddpm_step(module.diffusion, ours["net_guided"], x, t, ref["step_noise"], module.sampler.denoise_fn())
        cond = {"z_txt": z_txt, "z_txt_raw": z_txt, "tokens": tokens, "mask": mask}
        ours["sample"] = module.sample(cond, torch.Generator().manual_seed(SEED), guidance_scale=COND_SCALE, best_of=1)
    theirs = dict(ref)
    theirs["sample"] = F.normalize(ref["sample"], dim=-1)  # unclip's priors return unit-norm z_i
    return {key: float((ours[key] - theirs[key]).abs().max()) for key in ("net", "net_null", "net_guided", "step", "sample")}


def compare(out: Path) -> None:
    worst = 0.0
    for folder in sorted(p for p in out.iterdir() if (p / "reference.pt").exists()):
        diffs = compare_folder(folder)
        worst = max(worst, *diffs.values())
        print(f"{folder.name:>15}: " + "  ".join(f"max|{k}| {v:.2e}" for k, v in diffs.items()))
    print(f"worst {worst:.2e} (tolerance {TOLERANCE:.0e})")
    if worst > TOLERANCE:
        raise SystemExit(1)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("peer", "compare"):
        raise SystemExit(__doc__)
    {"peer": peer, "compare": compare}[sys.argv[1]](Path(sys.argv[2]))
