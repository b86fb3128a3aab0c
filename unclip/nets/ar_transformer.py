"""The autoregressive prior's net (unCLIP §2.2): a decoder-only transformer over

    [caption token states (L), z_t, similarity token, z_i tokens c_1 .. c_k]

trained with cross-entropy on the z_i tokens (see ``unclip.embedding_tokens`` for the vocabulary).
Sampling runs the prefix once and then one token per step against a growing key/value cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn as nn

from unclip.nets.layers import Block, causal_mask, init_gpt_weights, net_config
from unclip.nets.prior_transformer import PrefixCache


@dataclass
class ARConfig:
    embed_dim: int = 512        # D of z_t
    text_width: int = 512       # caption token states' width; 0 = z_t only
    max_text_tokens: int = 77
    components: int = 32        # k: z_i tokens per sample (PCA components)
    bins: int = 256             # tokens per component
    sim_bins: int = 32
    dim: int = 512
    depth: int = 6
    heads: int = 8
    ff_mult: int = 4
    dropout: float = 0.0


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Top-k, then nucleus (top-p, Holtzman et al. 2020) filtering: excluded logits become -inf."""
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


class ARTransformer(nn.Module):
    def __init__(self, config: ARConfig | dict):
        super().__init__()
        self.config = c = net_config(ARConfig, config)
        self.text_proj = nn.Linear(c.text_width, c.dim) if c.text_width else None
        self.text_embed_proj = nn.Linear(c.embed_dim, c.dim)
        self.null_text_embed = nn.Parameter(torch.zeros(c.dim))
        self.sim_embed = nn.Embedding(c.sim_bins, c.dim)
        self.token_embed = nn.Embedding(c.bins, c.dim)
        self.pos = nn.Parameter(torch.randn(c.max_text_tokens + 2 + c.components, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.ff_mult, c.dropout) for _ in range(c.depth))
        self.ln_f = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.bins)
        self.apply(init_gpt_weights)

    def hparams(self) -> dict:
        return asdict(self.config)

    def prefix(self, z_txt, tokens, mask, drop, sim) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L + 2, dim) embedded [token states, z_t, similarity token] and their visibility. Text
        positions are 0..L-1, the rest sit at fixed positions after the longest caption (trimmable)."""
        b, at = z_txt.shape[0], self.config.max_text_tokens
        drop = torch.zeros(b, dtype=torch.bool, device=z_txt.device) if drop is None else drop
        text_embed = torch.where(drop[:, None], self.null_text_embed.to(z_txt.dtype), self.text_embed_proj(z_txt))
        parts, valid = [], []
        if self.text_proj is not None and tokens is not None:
            if tokens.shape[1] > at:
                raise ValueError(f"{tokens.shape[1]} caption tokens exceed net.max_text_tokens={at}")
            parts.append(self.text_proj(tokens) + self.pos[: tokens.shape[1]])
            valid.append(mask.bool() & ~drop[:, None])
        parts += [(text_embed + self.pos[at])[:, None], (self.sim_embed(sim) + self.pos[at + 1])[:, None]]
        valid.append(torch.ones(b, 2, dtype=torch.bool, device=z_txt.device))
        return torch.cat(parts, dim=1), torch.cat(valid, dim=1)

    def embed_tokens(self, z_tokens: torch.Tensor, start: int) -> torch.Tensor:
        """z_i tokens (B, n) standing at component indices start .. start + n - 1."""
        first = self.config.max_text_tokens + 2 + start
        return self.token_embed(z_tokens) + self.pos[first: first + z_tokens.shape[1]]

    def forward(self, z_txt, tokens, mask, drop, sim, z_tokens) -> torch.Tensor:
        """Teacher-forced logits (B, k, bins): position of the similarity token predicts c_1, c_j predicts c_{j+1}."""
        prefix, valid = self.prefix(z_txt, tokens, mask, drop, sim)
        h = torch.cat([prefix, self.embed_tokens(z_tokens[:, :-1], 0)], dim=1)
        valid = torch.cat([valid, torch.ones(h.shape[0], h.shape[1] - valid.shape[1], dtype=torch.bool, device=h.device)], 1)
        attn_mask = causal_mask(valid, h.shape[1])
        for block in self.blocks:
            h, _ = block(h, attn_mask)
        return self.head(self.ln_f(h[:, -self.config.components:]))

    @torch.no_grad()
    def generate(self, z_txt, tokens, mask, drop, sim, pick: Callable[[torch.Tensor], torch.Tensor],
                 use_cache: bool = True) -> torch.Tensor:
        """k tokens per row; ``pick(logits (B, bins)) -> (B,)`` chooses each (guidance, temperature, top-k/p).
        ``use_cache=False`` recomputes the whole sequence every step (the reference the cache must equal)."""
        k = self.config.components
        if not use_cache:
            out = torch.zeros(len(z_txt), 0, dtype=torch.long, device=z_txt.device)
            for _ in range(k):
                padded = torch.cat([out, out.new_zeros(len(out), k - out.shape[1])], dim=1)  # positions > j unseen (causal)
                out = torch.cat([out, pick(self(z_txt, tokens, mask, drop, sim, padded)[:, out.shape[1]])[:, None]], 1)
            return out
        h, valid = self.prefix(z_txt, tokens, mask, drop, sim)
        attn_mask = causal_mask(valid, h.shape[1])
        cache = []
        for block in self.blocks:
            h, kv = block(h, attn_mask)
            cache.append(kv)
        state = PrefixCache(cache, valid)
        out = []
        logits = self.head(self.ln_f(h[:, -1]))
        for j in range(k):
            token = pick(logits)
            out.append(token)
            if j == k - 1:
                break
            h = self.embed_tokens(token[:, None], j)
            state.key_valid = torch.cat([state.key_valid, torch.ones_like(state.key_valid[:, :1])], dim=1)
            step_mask = causal_mask(state.key_valid, 1)
            for i, block in enumerate(self.blocks):
                h, state.kv[i] = block(h, step_mask, state.kv[i])
            logits = self.head(self.ln_f(h[:, -1]))
        return torch.stack(out, dim=1)
