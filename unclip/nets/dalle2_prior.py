"""DALLE2-pytorch's ``DiffusionPriorNetwork`` (the net of LAION's released priors) as unclip's own module,
behind the interface :class:`unclip.modules.diffusion_prior.DiffusionPriorModule` asks of its net. Its
weights are a DALLE2-pytorch state dict under the names of :data:`DALLE2_NAMES`; DALLE2-pytorch itself is
not needed.

The net reads, in this order (unCLIP §2.2, last paragraph),

    [text encodings (max_text_len), z_t (num_text_embeds), time (num_time_embeds),
     noised z_i (num_image_embeds), learned query]

through a causal transformer that has no positional embedding but rotary embeddings (on the first
min(32, dim_head) features of q and k), a T5 relative position bias, one shared key/value head
(multi-query) with a learned null key/value in front, cosine-similarity attention at scale 16, SwiGLU
feed-forwards and a final "stable" LayerNorm and projection. Caption positions without a token (the
padding) get learned per-position null encodings (DALL-E 1's learned padding). A dropped caption
(classifier-free guidance) replaces the text encodings and z_t with their learned nulls *and* the noised
z_i with ``null_image_embed``, as DALLE2-pytorch's ``forward_with_cond_scale`` drops both for its null
branch. One forward pass per step (no prefix cache): ``encode_prefix`` only gathers the condition.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip.nets.layers import net_config

ATTENTION_SCALE = 16.0   # DALLE2-pytorch's cosine_sim_scale: q, k unit-norm, logits 16 cos(q, k)
ROTARY_MAX_DIM = 32      # rotary on min(32, dim_head) features
ROTARY_THETA = 10_000.0
REL_POS_BUCKETS, REL_POS_MAX_DISTANCE = 32, 128  # T5 relative positions (DALLE2-pytorch's RelPosBias defaults)


@dataclass
class Dalle2PriorConfig:
    dim: int = 768                    # the net's width = image_embed_dim = the text encodings' width
    depth: int = 12
    dim_head: int = 64
    heads: int = 8
    ff_mult: int = 4
    num_timesteps: int | None = 1000  # learned time embedding per step; None: sinusoidal + MLP (continuous)
    num_time_embeds: int = 1
    num_image_embeds: int = 1
    num_text_embeds: int = 1
    max_text_len: int = 256
    norm_in: bool = False
    norm_out: bool = True
    final_proj: bool = True
    normformer: bool = False
    rotary_emb: bool = True
    attn_dropout: float = 0.0
    ff_dropout: float = 0.0
    embed_dim: int = 768              # D of z_i and z_t (must equal dim)
    text_width: int = 768             # the CLIP's token width (must equal dim); 0 = no text encodings
    max_text_tokens: int = 77         # the CLIP's context (tokens past max_text_len are cut, as DALLE2-pytorch does)


@dataclass
class Condition:
    z_txt: torch.Tensor   # (B, D) the text embedding
    tokens: torch.Tensor  # (B, max_text_len, dim) text encodings, padding already replaced by the null encodings
    drop: torch.Tensor    # (B,) bool: the null branch (text and noised z_i replaced by their learned nulls)


# ---------------------------------------------------------------------------------------------- layers
class GainLayerNorm(nn.Module):
    """LayerNorm with a gain and no bias (DALLE2-pytorch's ``LayerNorm``); ``stable`` first divides by the
    row's maximum (its final norm). eps 1e-5 in fp32, 1e-3 in half precision, as there."""

    def __init__(self, dim: int, stable: bool = False):
        super().__init__()
        self.stable = stable
        self.g = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stable:
            x = x / x.amax(dim=-1, keepdim=True).detach()
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        return F.layer_norm(x, x.shape[-1:], self.g.to(x.dtype), None, eps)


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (Su et al. 2021, eq. 34) on the first 2 len(freqs) features of x (..., N, d), position
    n rotating the interleaved pairs (x_2i, x_2i+1) by n freqs_i (rotary-embedding-torch's layout)."""
    n, rot = x.shape[-2], 2 * len(freqs)
    angles = (torch.arange(n, device=x.device, dtype=freqs.dtype)[:, None] * freqs).repeat_interleave(2, dim=-1)
    head, tail = x[..., :rot], x[..., rot:]
    pairs = head.unflatten(-1, (-1, 2))
    rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat((head * angles.cos().to(x.dtype) + rotated_half * angles.sin().to(x.dtype), tail), dim=-1)


def relative_position_bucket(relative: torch.Tensor) -> torch.Tensor:
    """T5's causal buckets (Raffel et al. 2020, §2.1): exact below 16 steps back, logarithmic to 128."""
    n = (-relative).clamp(min=0)
    exact = REL_POS_BUCKETS // 2
    far = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(REL_POS_MAX_DISTANCE / exact)
                   * (REL_POS_BUCKETS - exact)).long()
    return torch.where(n < exact, n, far.clamp(max=REL_POS_BUCKETS - 1))


class Attention(nn.Module):
    """Causal multi-query attention with a null key/value first, cosine-similarity logits and rotary q, k."""

    def __init__(self, c: Dalle2PriorConfig):
        super().__init__()
        inner = c.dim_head * c.heads
        self.heads = c.heads
        self.norm = GainLayerNorm(c.dim)
        self.null_kv = nn.Parameter(torch.randn(2, c.dim_head))
        self.to_q = nn.Linear(c.dim, inner, bias=False)
        self.to_kv = nn.Linear(c.dim, 2 * c.dim_head, bias=False)  # one key/value head shared by all query heads
        self.to_out = nn.Linear(inner, c.dim, bias=False)
        self.out_norm = GainLayerNorm(c.dim)
        self.dropout = nn.Dropout(c.attn_dropout)
        rot = min(ROTARY_MAX_DIM, c.dim_head)
        freqs = 1.0 / ROTARY_THETA ** (torch.arange(0, rot, 2)[: rot // 2].float() / rot)
        # a weight of the published state dict (each layer's copy), so it is a buffer loaded with the rest
        self.register_buffer("rotary_freqs", freqs if c.rotary_emb else None)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim); bias (heads, N, N + 1): the relative position bias over [null, keys]."""
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, N, d)
        k, v = self.to_kv(x).chunk(2, dim=-1)                              # (B, N, d) each
        if self.rotary_freqs is not None:
            q, k = rotate(q, self.rotary_freqs), rotate(k, self.rotary_freqs)
        null_k, null_v = (t.to(x.dtype).expand(b, 1, -1) for t in self.null_kv.unbind(0))
        k, v = torch.cat((null_k, k), dim=1), torch.cat((null_v, v), dim=1)  # (B, N + 1, d)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        sim = ATTENTION_SCALE * torch.einsum("bhid,bjd->bhij", q, k) + bias
        # query i sees the null key and positions 0..i
        causal = torch.ones(n, n + 1, dtype=torch.bool, device=x.device).triu(2)
        sim = sim.masked_fill(causal, -torch.finfo(sim.dtype).max)
        attn = self.dropout(sim.softmax(dim=-1, dtype=torch.float32).to(sim.dtype))
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).flatten(2)
        return self.out_norm(self.to_out(out))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): LN, W_in -> (x, gate), x silu(gate), optional NormFormer LN, W_out."""

    def __init__(self, c: Dalle2PriorConfig):
        super().__init__()
        inner = int(c.ff_mult * c.dim)
        self.norm = GainLayerNorm(c.dim)
        self.proj_in = nn.Linear(c.dim, 2 * inner, bias=False)
        self.post_norm = GainLayerNorm(inner) if c.normformer else nn.Identity()
        self.dropout = nn.Dropout(c.ff_dropout)
        self.proj_out = nn.Linear(inner, c.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(self.norm(x)).chunk(2, dim=-1)
        return self.proj_out(self.dropout(self.post_norm(h * F.silu(gate))))


class Block(nn.Module):
    def __init__(self, c: Dalle2PriorConfig):
        super().__init__()
        self.attn, self.ff = Attention(c), FeedForward(c)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn(x, bias) + x
        return self.ff(x) + x


class ContinuousTime(nn.Module):
    """DALLE2-pytorch's time embedding without ``num_timesteps``: sinusoids (sin first) then its 2-layer MLP."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.dim = dim
        hidden = 2 * out
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs
        return self.mlp(torch.cat((args.sin(), args.cos()), dim=-1))


# ------------------------------------------------------------------------------------------------- net
class Dalle2Prior(nn.Module):
    def __init__(self, config: Dalle2PriorConfig | dict):
        super().__init__()
        self.config = c = net_config(Dalle2PriorConfig, config)
        if c.embed_dim != c.dim:
            raise ValueError(f"the DALLE2-pytorch prior's width is its embedding size ({c.dim}), but the CLIP's embed_dim "
                             f"is {c.embed_dim}; use the CLIP it was trained with")
        if c.text_width and c.text_width != c.dim:
            raise ValueError(f"the DALLE2-pytorch prior reads text encodings of width {c.dim} (no projection), but the "
                             f"CLIP's tokens are {c.text_width} wide; use the CLIP it was trained with")
        d = c.dim
        self.text_embeds_proj = nn.Linear(d, d * c.num_text_embeds) if c.num_text_embeds > 1 else None
        self.image_embeds_proj = nn.Linear(d, d * c.num_image_embeds) if c.num_image_embeds > 1 else None
        if c.num_timesteps is not None:
            self.time_embed = nn.Embedding(c.num_timesteps, d * c.num_time_embeds)
        else:
            self.time_embed = ContinuousTime(d, d * c.num_time_embeds)
        self.query = nn.Parameter(torch.randn(d))
        self.null_text_tokens = nn.Parameter(torch.randn(1, c.max_text_len, d))
        self.null_text_embeds = nn.Parameter(torch.randn(1, c.num_text_embeds, d))
        self.null_image_embed = nn.Parameter(torch.randn(1, d))
        self.norm_in = GainLayerNorm(d) if c.norm_in else nn.Identity()
        self.rel_pos_bias = nn.Embedding(REL_POS_BUCKETS, c.heads)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm_out = GainLayerNorm(d, stable=True) if c.norm_out else nn.Identity()
        self.project_out = nn.Linear(d, d, bias=False) if c.final_proj else nn.Identity()

    def hparams(self) -> dict:
        return asdict(self.config)

    # ------------------------------------------------------------------------------------- inputs
    def encode_prefix(self, z_txt: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      drop: torch.Tensor | None = None) -> Condition:
        """The condition of each row: token states (B, L, dim) with their mask (B, L) cut or padded to
        max_text_len, positions without a token (or a dropped row's every position) the null encodings."""
        b, n = z_txt.shape[0], self.config.max_text_len
        drop = torch.zeros(b, dtype=torch.bool, device=z_txt.device) if drop is None else drop.bool()
        if tokens is None:  # no text encodings: every position is a null encoding (DALLE2-pytorch's empty encodings)
            tokens = z_txt.new_zeros(b, 0, self.config.dim)
            mask = torch.zeros(b, 0, dtype=torch.bool, device=z_txt.device)
        tokens, mask = tokens[:, :n], mask[:, :n].bool()
        tokens, mask = F.pad(tokens, (0, 0, 0, n - tokens.shape[1])), F.pad(mask, (0, n - mask.shape[1]), value=False)
        keep = (mask & ~drop[:, None])[..., None]
        tokens = torch.where(keep, tokens.to(z_txt.dtype), self.null_text_tokens.to(z_txt.dtype))
        return Condition(z_txt, tokens, drop)

    def sequence(self, cond: Condition, z_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B, max_text_len + text + time + image embeds + 1, dim), DALLE2-pytorch's token order."""
        c, b = self.config, z_noisy.shape[0]
        dtype = z_noisy.dtype
        drop = cond.drop[:, None, None]
        text = self.text_embeds_proj(cond.z_txt) if self.text_embeds_proj is not None else cond.z_txt
        text = torch.where(drop, self.null_text_embeds.to(dtype), text.view(b, c.num_text_embeds, c.dim).to(dtype))
        image = self.image_embeds_proj(z_noisy) if self.image_embeds_proj is not None else z_noisy
        image = torch.where(drop, self.null_image_embed.to(dtype), image.view(b, c.num_image_embeds, c.dim))
        time = self.time_embed(t).view(b, c.num_time_embeds, c.dim).to(dtype)
        query = self.query.to(dtype).expand(b, 1, -1)
        return torch.cat((cond.tokens.to(dtype), text, time, image, query), dim=1)

    # -------------------------------------------------------------------------------------- passes
    def denoise(self, cond: Condition, z_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The net's output (B, D) for noised z_i (B, D) at training steps t (B,): z_i, eps or v as trained."""
        h = self.norm_in(self.sequence(cond, z_noisy, t))
        n = h.shape[1]
        # T5 bias over [null key, keys]: DALLE2-pytorch counts the null key as position 0, the i-th token as i + 1
        relative = torch.arange(n + 1, device=h.device)[None] - torch.arange(n, device=h.device)[:, None]
        bias = self.rel_pos_bias(relative_position_bucket(relative)).permute(2, 0, 1).to(h.dtype)  # (heads, N, N + 1)
        for block in self.blocks:
            h = block(h, bias)
        return self.project_out(self.norm_out(h))[:, -1]

    def forward(self, z_noisy: torch.Tensor, t: torch.Tensor, z_txt: torch.Tensor, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(self.encode_prefix(z_txt, tokens, mask, drop), z_noisy, t)

    @staticmethod
    def repeat_prefix(cond: Condition, n: int) -> Condition:
        return Condition(cond.z_txt.repeat_interleave(n, 0), cond.tokens.repeat_interleave(n, 0),
                         cond.drop.repeat_interleave(n, 0))

    @staticmethod
    def cat_prefix(a: Condition, b: Condition) -> Condition:
        return Condition(torch.cat([a.z_txt, b.z_txt]), torch.cat([a.tokens, b.tokens]), torch.cat([a.drop, b.drop]))


# ------------------------------------------------------------------------------------ weight names
# DALLE2-pytorch DiffusionPriorNetwork name -> this net's name (regular expressions, applied in order)
DALLE2_NAMES = [
    (r"^to_text_embeds\.0\.", "text_embeds_proj."),
    (r"^to_image_embeds\.0\.", "image_embeds_proj."),
    (r"^to_time_embeds\.0\.weight$", "time_embed.weight"),
    (r"^to_time_embeds\.0\.1\.net\.0\.0\.", "time_embed.mlp.0."),
    (r"^to_time_embeds\.0\.1\.net\.1\.0\.", "time_embed.mlp.2."),
    (r"^to_time_embeds\.0\.1\.net\.2\.", "time_embed.mlp.4."),
    (r"^learned_query$", "query"),
    (r"^null_text_encodings$", "null_text_tokens"),
    (r"^causal_transformer\.init_norm\.", "norm_in."),
    (r"^causal_transformer\.rel_pos_bias\.relative_attention_bias\.", "rel_pos_bias."),
    (r"^causal_transformer\.layers\.(\d+)\.0\.rotary_emb\.freqs$", r"blocks.\1.attn.rotary_freqs"),
    (r"^causal_transformer\.layers\.(\d+)\.0\.to_out\.0\.", r"blocks.\1.attn.to_out."),
    (r"^causal_transformer\.layers\.(\d+)\.0\.to_out\.1\.", r"blocks.\1.attn.out_norm."),
    (r"^causal_transformer\.layers\.(\d+)\.0\.", r"blocks.\1.attn."),
    (r"^causal_transformer\.layers\.(\d+)\.1\.0\.", r"blocks.\1.ff.norm."),
    (r"^causal_transformer\.layers\.(\d+)\.1\.1\.", r"blocks.\1.ff.proj_in."),
    (r"^causal_transformer\.layers\.(\d+)\.1\.3\.", r"blocks.\1.ff.post_norm."),
    (r"^causal_transformer\.layers\.(\d+)\.1\.5\.", r"blocks.\1.ff.proj_out."),
    (r"^causal_transformer\.norm\.", "norm_out."),
    (r"^causal_transformer\.project_out\.", "project_out."),
]


def from_dalle2_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A DALLE2-pytorch ``DiffusionPriorNetwork`` state dict under this net's names (unknown names kept, so
    the caller names them as unexpected)."""
    renamed = {}
    for name, tensor in state.items():
        new = name
        for pattern, replacement in DALLE2_NAMES:
            new, hits = re.subn(pattern, replacement, name)
            if hits:
                break
        renamed[new] = tensor
    return renamed
