"""Decoder training throughput at 64 px, batch 8: ours next to dalle2-pytorch's ``Unet`` + ``Decoder`` at
the closest matching config, measured back to back. Ours runs the module's real training step
(``DecoderModule.loss`` + backward + AdamW)."""

from __future__ import annotations

import torch

from bench.timing import comparison_rows, ours_steps_per_s, peer_steps_per_s, train_steps_per_s
from unclip.modules.decoder import DecoderModule

CONFIG = {"size": 64, "batch": 8, "dim": 64, "mults": [1, 2, 3, 4], "embed_dim": 512}


class NoCLIP:
    """The decoder's training step never calls CLIP without text conditioning; only its widths are read."""

    text_width = 512


def ours(cfg: dict, steps: int = 3, repeats: int = 2, precision: str = "32-true") -> dict:
    torch.manual_seed(0)
    size = cfg["size"]
    attention = [size >> level for level in range(1, len(cfg["mults"]))]
    net = {"image_size": size, "channels": cfg["dim"], "channel_mult": cfg["mults"], "num_res_blocks": 2,
           "attention_resolutions": attention, "head_channels": 32, "embed_dim": cfg["embed_dim"]}
    module = DecoderModule(net, {"schedule": "cosine", "prediction": "eps"}, {"steps": 50}, clip=NoCLIP())
    batch = {"image": torch.rand(cfg["batch"], 3, size, size) * 2 - 1, "img_emb": torch.randn(cfg["batch"], cfg["embed_dim"]),
             "caption": [""] * cfg["batch"]}
    return train_steps_per_s(module, batch, steps, repeats, precision)


def peer(cfg: dict, steps: int = 3, repeats: int = 2) -> dict | None:
    return peer_steps_per_s("peer_decoder.py", cfg, steps, repeats)


def rows(cfg: dict = CONFIG, threads: int = 2) -> list[tuple[str, str, str]]:
    cfg = {**cfg, "threads": threads}
    label = f"{cfg['size']} px, batch {cfg['batch']}, width {cfg['dim']}, mults {cfg['mults']}"
    return comparison_rows("decoder train step", "dalle2-pytorch Unet + Decoder", label,
                           ours_steps_per_s("decoder", cfg), peer(cfg),
                           ours_steps_per_s("decoder", {**cfg, "precision": "bf16-mixed"}))
