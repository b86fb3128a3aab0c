"""dalle2-pytorch's DiffusionPrior training step, timed; run by bench/.venv-peer's Python (its own pins).

    bench/.venv-peer/bin/python bench/peer_prior.py '{"dim": 512, "depth": 6, "heads": 8, "batch": 64, "tokens": 77}'

Prints one JSON line: steps/s and the parameter count. Inputs are precomputed CLIP-like embeddings, as a
prior trained from a cache sees them.
"""

import json
import resource
import sys
import time

import torch
from dalle2_pytorch import DiffusionPrior, DiffusionPriorNetwork


def main(cfg: dict) -> None:
    torch.set_num_threads(cfg.get("threads", 2))
    torch.manual_seed(0)
    dim, batch, tokens = cfg["dim"], cfg["batch"], cfg["tokens"]
    net = DiffusionPriorNetwork(dim=dim, depth=cfg["depth"], heads=cfg["heads"], dim_head=dim // cfg["heads"],
                                ff_mult=cfg.get("ff_mult", 4), num_timesteps=1000, max_text_len=tokens)
    prior = DiffusionPrior(net=net, image_embed_dim=dim, timesteps=1000, cond_drop_prob=0.1,
                           condition_on_text_encodings=True)
    optimizer = torch.optim.AdamW(prior.parameters(), lr=1e-4)
    text_embed = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    image_embed = torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1)
    low, high = cfg.get("lengths") or [tokens, tokens]  # the same caption lengths as ours (same seed)
    lengths = torch.randint(low, high + 1, (batch,), generator=torch.Generator().manual_seed(0))
    # dalle2-pytorch masks encodings that are exactly zero (its padding), but still computes every position
    text_encodings = torch.randn(batch, tokens, dim) * (torch.arange(tokens)[None] < lengths[:, None])[..., None]
    rates = []
    for _ in range(cfg.get("repeats", 2)):
        start = None
        for step in range(cfg.get("steps", 3) + 1):
            if step == 1:
                start = time.perf_counter()  # the first step warms up allocators
            loss = prior(text_embed=text_embed, image_embed=image_embed.clone(), text_encodings=text_encodings)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rates.append(cfg.get("steps", 3) / (time.perf_counter() - start))
    print(json.dumps({"steps_per_s": max(rates), "params": sum(p.numel() for p in net.parameters()),
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
