"""The diffusion prior's net (unCLIP §2.2): a decoder-only transformer with a causal mask over

    [caption token states (L), z_t, timestep embedding, noised z_i, learned query]

whose output at the query predicts the clean z_i. Plain torch; embeddings come in normalised.

Causality makes the first L + 1 positions independent of the timestep and the noised z_i, so sampling
runs them once (``encode_prefix``) and each denoising step only processes the last three tokens
(``denoise``) against the cached keys and values of the prefix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from unclip.nets.layers import Block, causal_mask, init_gpt_weights, net_config, timestep_embedding


@dataclass
class PriorConfig:
    embed_dim: int = 512        # D: CLIP embedding size of z_t and z_i
    text_width: int = 512       # W: width of the caption token states; 0 = condition on z_t only
    max_text_tokens: int = 77   # L: the CLIP text context length
    dim: int = 512
    depth: int = 6
    heads: int = 8
    ff_mult: int = 4
    dropout: float = 0.0


@dataclass
class PrefixCache:
    kv: list            # per block: (k, v), each (B, heads, L + 1, dim / heads)
    key_valid: torch.Tensor  # (B, L + 1) bool


class PriorTransformer(nn.Module):
    def __init__(self, config: PriorConfig | dict):
        super().__init__()
        self.config = c = net_config(PriorConfig, config)
        self.text_proj = nn.Linear(c.text_width, c.dim) if c.text_width else None
        self.text_embed_proj = nn.Linear(c.embed_dim, c.dim)
        self.null_text_embed = nn.Parameter(torch.zeros(c.dim))  # stands in for z_t when the caption is dropped (CFG)
        self.time_mlp = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.image_embed_proj = nn.Linear(c.embed_dim, c.dim)
        self.query = nn.Parameter(torch.randn(c.dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(c.max_text_tokens + 4, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c.dim, c.heads, c.ff_mult, c.dropout) for _ in range(c.depth))
        self.ln_f = nn.LayerNorm(c.dim)
        self.out = nn.Linear(c.dim, c.embed_dim)
        self.apply(init_gpt_weights)

    def hparams(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------------------------------- inputs
    def prefix_tokens(self, z_txt: torch.Tensor, tokens: torch.Tensor | None, mask: torch.Tensor | None,
                      drop: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L + 1, dim) embedded [token states, z_t] and which of them may be attended to."""
        b = z_txt.shape[0]
        drop = torch.zeros(b, dtype=torch.bool, device=z_txt.device) if drop is None else drop
        text_embed = torch.where(drop[:, None], self.null_text_embed.to(z_txt.dtype), self.text_embed_proj(z_txt))
        # positions: tokens 0..L-1, then z_t, time, noised z_i, query at fixed positions after the longest
        # caption, so a batch of short captions may be trimmed of padding without changing the result
        text_pos = self.config.max_text_tokens
        parts, valid = [], []
        if self.text_proj is not None and tokens is not None:
            if tokens.shape[1] > self.config.max_text_tokens:
                raise ValueError(f"{tokens.shape[1]} caption tokens exceed net.max_text_tokens={self.config.max_text_tokens}")
            parts.append(self.text_proj(tokens) + self.pos[: tokens.shape[1]])
            valid.append(mask.bool() & ~drop[:, None])  # a dropped caption hides all of its tokens
        parts.append((text_embed + self.pos[text_pos])[:, None])
        valid.append(torch.ones(b, 1, dtype=torch.bool, device=z_txt.device))
        return torch.cat(parts, dim=1), torch.cat(valid, dim=1)

    def suffix_tokens(self, z_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, 3, dim): [timestep embedding, noised z_i, query]."""
        time = self.time_mlp(timestep_embedding(t, self.config.dim).to(z_noisy.dtype))
        query = self.query.to(z_noisy.dtype).expand(z_noisy.shape[0], -1)
        h = torch.stack([time, self.image_embed_proj(z_noisy), query], dim=1)
        start = self.config.max_text_tokens + 1
        return h + self.pos[start: start + 3]

    # -------------------------------------------------------------------------------------- passes
    def forward(self, z_noisy: torch.Tensor, t: torch.Tensor, z_txt: torch.Tensor, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        """z_noisy, z_txt: (B, D); t: (B,) training steps; tokens: (B, L, W) with mask (B, L); drop: (B,)
        bool, caption dropped (CFG). Returns the predicted z_i (B, D), the output at the query."""
        prefix, valid = self.prefix_tokens(z_txt, tokens, mask, drop)
        h = torch.cat([prefix, self.suffix_tokens(z_noisy, t)], dim=1)
        valid = torch.cat([valid, torch.ones(len(h), 3, dtype=torch.bool, device=h.device)], dim=1)
        attn_mask = causal_mask(valid, h.shape[1])
        for index, block in enumerate(self.blocks):
            # only the query's output is read, so the last block computes that one position (~1/depth saved)
            h, _ = block(h, attn_mask, last=1 if index == len(self.blocks) - 1 else None)
        return self.out(self.ln_f(h[:, -1]))

    def encode_prefix(self, z_txt: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      drop: torch.Tensor | None = None) -> PrefixCache:
        """Runs [token states, z_t] once; what every denoising step of a sample attends to."""
        h, valid = self.prefix_tokens(z_txt, tokens, mask, drop)
        attn_mask = causal_mask(valid, h.shape[1])
        kv = []
        for block in self.blocks:
            h, cache = block(h, attn_mask)
            kv.append(cache)
        return PrefixCache(kv, valid)

    def denoise(self, prefix: PrefixCache, z_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The predicted z_i from the cached prefix; equals ``forward`` on the same inputs."""
        h = self.suffix_tokens(z_noisy, t)
        valid = torch.cat([prefix.key_valid, torch.ones(len(h), 3, dtype=torch.bool, device=h.device)], dim=1)
        attn_mask = causal_mask(valid, 3)
        for block, past in zip(self.blocks, prefix.kv):
            h, _ = block(h, attn_mask, past)
        return self.out(self.ln_f(h[:, -1]))


def repeat_prefix(prefix: PrefixCache, n: int) -> PrefixCache:
    """Each row repeated ``n`` times (row-major), for n samples per caption."""
    return PrefixCache([(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in prefix.kv],
                       prefix.key_valid.repeat_interleave(n, 0))


def cat_prefix(a: PrefixCache, b: PrefixCache) -> PrefixCache:
    """Batch-concatenation of two prefixes (conditional, then unconditional: classifier-free guidance)."""
    return PrefixCache([(torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a.kv, b.kv)],
                       torch.cat([a.key_valid, b.key_valid]))


# the module reaches these through its net, so a net of another layout brings its own
PriorTransformer.repeat_prefix = staticmethod(repeat_prefix)
PriorTransformer.cat_prefix = staticmethod(cat_prefix)
