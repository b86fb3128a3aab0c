"""Diffusion prior training throughput: ours next to dalle2-pytorch's ``DiffusionPrior`` at the same
config (dim, depth, heads, batch, caption tokens), measured back to back in one invocation.

Ours is timed through the module's real training step (``DiffusionPriorModule.loss`` + backward +
AdamW) with cached token states, so conditioning, normalisation and the diffusion loss are included.
"""

from __future__ import annotations

import torch

from bench.roofline import dense_bound_row, matmul_gflops, roofline_row
from bench.timing import comparison_rows, ours_steps_per_s, peer_steps_per_s, train_steps_per_s
from unclip.modules.diffusion_prior import DiffusionPriorModule

PAPER_LIKE = {"dim": 512, "depth": 6, "heads": 8, "batch": 64, "tokens": 77}
# the same, with captions of 8-32 real tokens zero-padded to 77 (typical of LAION-style captions)
SHORT_CAPTIONS = {**PAPER_LIKE, "lengths": [8, 32]}


def caption_lengths(cfg: dict) -> torch.Tensor:
    """Real tokens per caption: all of them, or uniform in ``cfg["lengths"]`` (the same draw for both sides)."""
    low, high = cfg.get("lengths") or [cfg["tokens"], cfg["tokens"]]
    return torch.randint(low, high + 1, (cfg["batch"],), generator=torch.Generator().manual_seed(0))


def ours(cfg: dict, steps: int = 3, repeats: int = 2, precision: str = "32-true") -> dict:
    torch.manual_seed(0)
    dim, batch, tokens = cfg["dim"], cfg["batch"], cfg["tokens"]
    net = {"embed_dim": dim, "text_width": dim, "max_text_tokens": tokens, "dim": dim, "depth": cfg["depth"],
           "heads": cfg["heads"], "ff_mult": 4}
    module = DiffusionPriorModule(net, {"schedule": "cosine", "num_timesteps": 1000, "prediction": "x0"}, {"steps": 64})
    token_states = torch.randn(batch, tokens, dim) * (torch.arange(tokens)[None] < caption_lengths(cfg)[:, None])[..., None]
    batch_data = {"img_emb": torch.randn(batch, dim), "txt_emb": torch.randn(batch, dim),
                  "txt_tok": token_states, "key": [str(i) for i in range(batch)]}
    return train_steps_per_s(module, batch_data, steps, repeats, precision)


def other_prior(cfg: dict, kind: str) -> "torch.nn.Module":
    """The AR prior (paper-like tokens: 319 PCA components of 1024 bins would not fit a 512-d z_i, so 256 x
    1024) or the contrastive prior at the diffusion prior's transformer size; the AR tokenizer is fit on
    random embeddings (its step does not depend on what the bins are)."""
    dim = cfg["dim"]
    net = {"embed_dim": dim, "text_width": dim, "max_text_tokens": cfg["tokens"], "dim": dim, "depth": cfg["depth"],
           "heads": cfg["heads"], "ff_mult": 4}
    if kind == "contrastive":
        from unclip.modules.contrastive_prior import ContrastivePriorModule

        return ContrastivePriorModule(net)
    from unclip.modules.ar_prior import ARPriorModule

    module = ARPriorModule(net, {"components": 256, "bins": 1024, "sim_bins": 32, "mode": "quantile"})
    z_img, z_txt = (torch.nn.functional.normalize(torch.randn(8192, dim), dim=-1) for _ in range(2))
    _, _, v = torch.linalg.svd(z_img - z_img.mean(0), full_matrices=False)
    module.tokenizer.fit(z_img, z_txt, z_img.mean(0), v, torch.full((dim,), 1.0 / dim))
    return module


def ours_other(cfg: dict, steps: int = 3, repeats: int = 2, precision: str = "32-true") -> dict:
    """``bench.worker prior_ar`` / ``prior_contrastive``: the other priors' real training steps, same batch."""
    torch.manual_seed(0)
    module = other_prior(cfg, cfg["kind"])
    batch, tokens, dim = cfg["batch"], cfg["tokens"], cfg["dim"]
    token_states = torch.randn(batch, tokens, dim) * (torch.arange(tokens)[None] < caption_lengths(cfg)[:, None])[..., None]
    batch_data = {"img_emb": torch.randn(batch, dim), "txt_emb": torch.randn(batch, dim), "txt_tok": token_states,
                  "key": [str(i) for i in range(batch)]}
    return train_steps_per_s(module, batch_data, steps, repeats, precision)


def other_rows(cfg: dict, rates: dict) -> list[tuple[str, str, str]]:
    out = []
    for kind, name in (("ar", "AR prior"), ("contrastive", "contrastive prior")):
        run = {**cfg, "kind": kind}
        fp32, bf16 = ours_steps_per_s("prior_other", run), ours_steps_per_s("prior_other", {**run, "precision": "bf16-mixed"})
        label = f"dim {cfg['dim']}, depth {cfg['depth']}, batch {cfg['batch']}, {cfg['tokens']} tokens"
        what = f"{name} train step ({label})"
        out += [(f"{what}, ours, fp32", f"{fp32['steps_per_s']:.3f} steps/s", f"{fp32['params'] / 1e6:.1f}M params"),
                (f"{what}, ours, bf16-mixed", f"{bf16['steps_per_s']:.3f} steps/s", f"{bf16['steps_per_s'] / fp32['steps_per_s']:.2f}x our fp32"),
                roofline_row(what, bf16["gflop_per_step"], rates["bf16"], bf16["steps_per_s"], "bf16", "bf16 matmul"),
                dense_bound_row(what, bf16["dense_s"], bf16["steps_per_s"], "bf16")]
    return out


def peer(cfg: dict, steps: int = 3, repeats: int = 2) -> dict | None:
    return peer_steps_per_s("peer_prior.py", cfg, steps, repeats)


def matmul_rates() -> dict[str, float]:
    return {"fp32": matmul_gflops(torch.float32), "bf16": matmul_gflops(torch.bfloat16)}


def rows(threads: int = 2) -> list[tuple[str, str, str]]:
    torch.set_num_threads(threads)
    # measured before and after the steps, the best of the two: a passing load on the machine must not lower
    # the roofline (it would flatter the step)
    first = matmul_rates()
    steps = [({**PAPER_LIKE, "threads": threads}, *measure({**PAPER_LIKE, "threads": threads})),
             ({**SHORT_CAPTIONS, "threads": threads}, *measure({**SHORT_CAPTIONS, "threads": threads}))]
    rates = {k: max(v, first[k]) for k, v in matmul_rates().items()}
    others = other_rows({**PAPER_LIKE, "threads": threads}, rates)
    return [row for cfg, fp32, bf16 in steps for row in compare(cfg, fp32, bf16, rates)] + others + precision_rows(rates)


def measure(cfg: dict) -> tuple[dict, dict]:
    return ours_steps_per_s("prior", cfg), ours_steps_per_s("prior", {**cfg, "precision": "bf16-mixed"})


def compare(cfg: dict, fp32: dict, bf16: dict, rates: dict) -> list[tuple[str, str, str]]:
    label = f"dim {cfg['dim']}, depth {cfg['depth']}, batch {cfg['batch']}, {cfg['tokens']} tokens"
    if cfg.get("lengths"):
        label += f" of which {cfg['lengths'][0]}-{cfg['lengths'][1]} real"
    what = f"diffusion prior train step ({label})"
    return comparison_rows("diffusion prior train step", "dalle2-pytorch DiffusionPrior", label, fp32, peer(cfg), bf16) + [
        roofline_row(what, fp32["gflop_per_step"], rates["fp32"], fp32["steps_per_s"], "fp32", "fp32 matmul"),
        roofline_row(what, bf16["gflop_per_step"], rates["bf16"], bf16["steps_per_s"], "bf16", "bf16 matmul"),
        dense_bound_row(what, fp32["dense_s"], fp32["steps_per_s"], "fp32"),
        dense_bound_row(what, bf16["dense_s"], bf16["steps_per_s"], "bf16")]


def precision_rows(rates: dict) -> list[tuple[str, str, str]]:
    return [("matmul 5184x512x2048 (the prior's MLP), fp32", f"{rates['fp32']:,.1f} GFLOP/s", "warmed up, best of 10, before and after the steps"),
            ("matmul 5184x512x2048 (the prior's MLP), bf16", f"{rates['bf16']:,.1f} GFLOP/s",
             f"{rates['bf16'] / rates['fp32']:.2f}x fp32 (bf16-mixed pays only on CPUs with AVX512-BF16/AMX)")]
