"""Small building blocks shared by the nets: their config check, timestep embedding and a pre-LN transformer
block with an optional key/value cache."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def net_config(cls, config):
    """``config`` (a dict, or already a ``cls``) as the net's config dataclass ``cls``. Keys ``cls`` does not have
    (a typo, or a checkpoint written by another version of unclip) are refused by name, not by a bare TypeError."""
    if isinstance(config, cls):
        return config
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__} has no {', '.join(map(repr, unknown))} (its keys: {', '.join(known)}); a "
                         f"checkpoint holding such keys was written by another version of unclip")
    return cls(**config)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (training) timesteps, (B,) -> (B, dim) (Transformer positions, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def init_gpt_weights(module: nn.Module) -> None:
    """GPT-2 / nanoGPT initialisation for the transformer priors: N(0, 0.02) weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


# When two plain matmuls beat the fused CPU kernel in training: while the scores they hold for the backward
# stay small (batch x heads x queries x keys up to 2^24). The priors' steps (81 keys) run 1.1x faster in fp32
# and 1.5x in bf16 with them, a UNet level's 64-260 keys 1.5-5x in bf16; for larger scores the fused kernel
# wins (the AR prior's 64 x 8 x 334 x 334, bf16: 284 against 417 ms forward + backward; a 32 px UNet level's
# 8 x 4 x 1024 x 1028: 63 against 167 ms).
PLAIN_ATTENTION_MAX_SCORES = 1 << 24


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ / √d, masked) v (Vaswani et al. 2017, eq. 1); q (B, H, Q, d), k and v (B, H, K, d), mask
    bool, broadcastable to (B, H, Q, K). Training on a CPU with at most ``PLAIN_ATTENTION_MAX_SCORES`` scores
    takes two plain matmuls; everywhere else the fused kernel (which needs d contiguous)."""
    plain = (q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad
             and q.shape[:-1].numel() * k.shape[-2] <= PLAIN_ATTENTION_MAX_SCORES)
    if not plain:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # scaling q: Q x d numbers, not Q x K
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # torch's CPU softmax accumulates in fp32 whatever the input: no upcast copy of the scores is needed
    weights = torch.softmax(scores, dim=-1)
    return F.dropout(weights, dropout_p) @ v if dropout_p else weights @ v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple | None = None, last: int | None = None):
        """x: (B, S, C); mask: bool (B, 1, S, S_past + S), True = may attend; past: cached (k, v).
        ``last``: only the last ``last`` positions query (keys and values still come from all of x)."""
        b, s, c = x.shape
        if last is None:
            q, k, v = self.qkv(x).view(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        else:
            w_q, w_kv = self.qkv.weight.split([c, 2 * c])
            b_q, b_kv = self.qkv.bias.split([c, 2 * c])
            q = F.linear(x[:, -last:], w_q, b_q).view(b, last, self.heads, c // self.heads).transpose(1, 2)
            k, v = F.linear(x, w_kv, b_kv).view(b, s, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            mask = None if mask is None else mask[..., -last:, :]
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = attention(q, k, v, mask, self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, q.shape[2], c)), (k, v)


class Block(nn.Module):
    """Pre-LN transformer block (GPT-2 / nanoGPT)."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple | None = None, last: int | None = None):
        """``last``: compute outputs only for the last ``last`` positions (a final block whose other outputs
        nobody reads skips their attention output, projection and MLP)."""
        y, kv = self.attn(self.ln1(x), mask, past, last)
        x = (x if last is None else x[:, -last:]) + y
        return x + self.mlp(self.ln2(x)), kv


def causal_mask(key_valid: torch.Tensor, queries: int) -> torch.Tensor:
    """Bool (B, 1, Q, K) mask for the last ``queries`` of K positions: causal, and keys with
    ``key_valid`` False hidden, except that a position always sees itself (so no row is empty)."""
    b, k = key_valid.shape
    q_pos = torch.arange(k - queries, k, device=key_valid.device)[:, None]
    k_pos = torch.arange(k, device=key_valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & (key_valid[:, None, :] | (k_pos == q_pos)[None])
    return allowed[:, None]
