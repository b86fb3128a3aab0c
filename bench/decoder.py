"""Decoder training throughput at 64 px, batch 8: ours next to dalle2-pytorch's ``Unet`` + ``Decoder`` at
the closest matching config, measured back to back. Ours runs the module's real training step
(``DecoderModule.loss`` + backward + AdamW)."""

from __future__ import annotations

import torch

from bench.roofline import conv_gflops, dense_bound_row, roofline_row
from bench.timing import comparison_rows, ours_steps_per_s, peer_steps_per_s, train_steps_per_s
from unclip.modules.decoder import DecoderModule

CONFIG = {"size": 64, "batch": 8, "dim": 64, "mults": [1, 2, 3, 4], "embed_dim": 512}
# the demo's decoder (conf/model/decoder.yaml at the demo's batch): 32 px as 2x2 patches, v prediction, channels_last
DEMO = {"size": 32, "batch": 32, "dim": 48, "mults": [1, 2, 2], "embed_dim": 512, "patch_size": 2, "num_res_blocks": 1,
        "attention": [8, 4], "prediction": "v", "channels_last": True}


class NoCLIP:
    """The decoder's training step never calls CLIP without text conditioning; only its widths are read."""

    text_width = 512


def ours(cfg: dict, steps: int = 3, repeats: int = 2, precision: str = "32-true") -> dict:
    torch.manual_seed(0)
    size = cfg["size"]
    attention = cfg.get("attention") or [size >> level for level in range(1, len(cfg["mults"]))]
    net = {"image_size": size, "channels": cfg["dim"], "channel_mult": cfg["mults"], "num_res_blocks": cfg.get("num_res_blocks", 2),
           "attention_resolutions": attention, "head_channels": 32, "embed_dim": cfg["embed_dim"],
           "patch_size": cfg.get("patch_size", 1), "channels_last": cfg.get("channels_last", False)}
    diffusion = {"schedule": "cosine", "prediction": cfg.get("prediction", "eps")}
    module = DecoderModule(net, diffusion, {"steps": 50}, clip=NoCLIP())
    batch = {"image": torch.rand(cfg["batch"], 3, size, size) * 2 - 1, "img_emb": torch.randn(cfg["batch"], cfg["embed_dim"]),
             "caption": [""] * cfg["batch"]}
    return train_steps_per_s(module, batch, steps, repeats, precision)


def peer(cfg: dict, steps: int = 3, repeats: int = 2) -> dict | None:
    return peer_steps_per_s("peer_decoder.py", cfg, steps, repeats)


def label_of(cfg: dict) -> str:
    label = f"{cfg['size']} px, batch {cfg['batch']}, width {cfg['dim']}, mults {cfg['mults']}"
    label += f", {cfg['patch_size']}x{cfg['patch_size']} patches" if cfg.get("patch_size", 1) > 1 else ""
    return label + (", channels_last" if cfg.get("channels_last") else "")


def rows(configs: tuple[dict, ...] = (CONFIG, DEMO), threads: int = 2) -> list[tuple[str, str, str]]:
    """Each config: ours fp32 and bf16-mixed (the peer's fp32 at the 64 px one, whose layout it shares), the
    bf16 and fp32 convolution rooflines and the dense-op bounds."""
    torch.set_num_threads(threads)
    first = {"fp32": conv_gflops(torch.float32), "bf16": conv_gflops(torch.bfloat16)}
    measured = []
    for cfg in configs:
        cfg = {**cfg, "threads": threads}
        measured.append((cfg, ours_steps_per_s("decoder", cfg), ours_steps_per_s("decoder", {**cfg, "precision": "bf16-mixed"})))
    rates = {k: max(first[k], conv_gflops(getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[k]))) for k in first}
    out = []
    for cfg, fp32, bf16 in measured:
        label = label_of(cfg)
        what = f"decoder train step ({label})"
        patched = cfg.get("patch_size", 1) > 1  # the peer's UNet has no patches
        out += comparison_rows("decoder train step", None if patched else "dalle2-pytorch Unet + Decoder", label, fp32,
                               None if patched else peer(cfg), bf16)
        out += [roofline_row(what, fp32["gflop_per_step"], rates["fp32"], fp32["steps_per_s"], "fp32", "fp32 3x3 conv"),
                roofline_row(what, bf16["gflop_per_step"], rates["bf16"], bf16["steps_per_s"], "bf16", "bf16 3x3 conv"),
                dense_bound_row(what, fp32["dense_s"], fp32["steps_per_s"], "fp32"),
                dense_bound_row(what, bf16["dense_s"], bf16["steps_per_s"], "bf16")]
    return out + [
        ("conv 3x3, 128 channels, 32 px, batch 8, fp32", f"{rates['fp32']:,.1f} GFLOP/s", "channels_last, warmed up, best of 10, before and after the steps"),
        ("conv 3x3, 128 channels, 32 px, batch 8, bf16", f"{rates['bf16']:,.1f} GFLOP/s", f"{rates['bf16'] / rates['fp32']:.2f}x fp32")]
