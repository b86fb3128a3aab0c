"""dalle2-pytorch's Unet + Decoder training step, timed; run by bench/.venv-peer's Python.

    bench/.venv-peer/bin/python bench/peer_decoder.py '{"size": 64, "batch": 8, "dim": 64, "mults": [1, 2, 3, 4]}'

The closest match to our 64 px decoder: same width and multipliers, 2 resnet blocks per level,
attention below full resolution, z_i conditioning (tokens + time), fixed variance, no text.
"""

import json
import resource
import sys
import time

import torch
from dalle2_pytorch import Decoder, Unet


def main(cfg: dict) -> None:
    torch.set_num_threads(cfg.get("threads", 2))
    torch.manual_seed(0)
    levels = len(cfg["mults"])
    unet = Unet(dim=cfg["dim"], image_embed_dim=cfg.get("embed_dim", 512), cond_on_image_embeds=True,
                cond_on_text_encodings=False, dim_mults=tuple(cfg["mults"]), num_resnet_blocks=2,
                self_attn=(False,) + (True,) * (levels - 1), channels=3)
    decoder = Decoder(unet=unet, image_size=cfg["size"], timesteps=1000, image_cond_drop_prob=0.1, text_cond_drop_prob=0.5,
                      learned_variance=False)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    images = torch.rand(cfg["batch"], 3, cfg["size"], cfg["size"])
    image_embed = torch.nn.functional.normalize(torch.randn(cfg["batch"], cfg.get("embed_dim", 512)), dim=-1)
    rates = []
    for _ in range(cfg.get("repeats", 2)):
        start = None
        for step in range(cfg.get("steps", 3) + 1):
            if step == 1:
                start = time.perf_counter()
            loss = decoder(images, image_embed=image_embed)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(cfg.get("steps", 3) / (time.perf_counter() - start))
    print(json.dumps({"steps_per_s": max(rates), "params": sum(p.numel() for p in unet.parameters()),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
