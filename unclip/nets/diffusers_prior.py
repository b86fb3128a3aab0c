"""A published diffusion prior's net (karlo, Kandinsky 2.2): diffusers' ``PriorTransformer`` behind the
interface :class:`unclip.modules.diffusion_prior.DiffusionPriorModule` asks of its net.

The published transformer reads, in this order (unCLIP §2.2),

    [caption token states (num_embeddings), z_t, timestep embedding, noised z_i, learned query]

with the token states padded to exactly ``num_embeddings`` positions and a mask hiding the padding, and
outputs the predicted z_i at the query. Its sequence is one forward pass (no prefix cache), so
``encode_prefix`` only gathers the condition and ``denoise`` runs the whole transformer. A dropped caption
(classifier-free guidance) is the empty prompt's encoding, as the published pipelines use for their
unconditional branch: the module sets it (``null``) from its CLIP before sampling or training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip.nets.layers import net_config


@dataclass
class DiffusersPriorConfig:
    prior: dict = field(default_factory=dict)  # diffusers PriorTransformer config (its config.json, plain)
    embed_dim: int = 768        # D: z_i and z_t size
    text_width: int = 768       # W: the caption token width (the published prior projects W = embedding_dim)
    max_text_tokens: int = 77   # L: the CLIP text context length (at most the prior's num_embeddings)


@dataclass
class Condition:
    z_txt: torch.Tensor   # (B, D) proj_embedding
    tokens: torch.Tensor  # (B, num_embeddings, W) encoder_hidden_states
    mask: torch.Tensor    # (B, num_embeddings) bool attention mask, True for real tokens


class DiffusersPrior(nn.Module):
    def __init__(self, config: DiffusersPriorConfig | dict):
        super().__init__()
        from diffusers import PriorTransformer as Published  # an optional dependency: only published priors need it

        self.config = c = net_config(DiffusersPriorConfig, config)
        self.prior = Published(**c.prior)
        p = self.prior.config
        out_dim = p.clip_embed_dim or p.embedding_dim
        z_txt_dim = p.embedding_proj_dim or p.embedding_dim
        if c.embed_dim != p.embedding_dim or c.embed_dim != out_dim or c.embed_dim != z_txt_dim:
            raise ValueError(f"the published prior works on embeddings of size {p.embedding_dim} (z_t {z_txt_dim}, output "
                             f"{out_dim}) but the CLIP's embed_dim is {c.embed_dim}; use the CLIP it was made for")
        if c.text_width != p.embedding_dim or c.max_text_tokens > p.num_embeddings:
            raise ValueError(f"the published prior reads {p.num_embeddings} caption token states of width {p.embedding_dim}, "
                             f"but the CLIP gives {c.max_text_tokens} of width {c.text_width}; use the CLIP it was made for")
        self.null: Condition | None = None  # the empty prompt's condition (1 row); a plain attribute, not a buffer

    def hparams(self) -> dict:
        return asdict(self.config)

    @property
    def num_tokens(self) -> int:
        return int(self.prior.config.num_embeddings)

    # ------------------------------------------------------------------------------------- inputs
    def pad(self, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, W), (B, L) -> (B, num_embeddings, ...): the published positional embedding has one row per
        position, so trimmed captions are padded back (the padding is masked, its values never seen)."""
        extra = self.num_tokens - tokens.shape[1]
        if extra < 0:
            raise ValueError(f"{tokens.shape[1]} caption tokens exceed the published prior's {self.num_tokens}")
        return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask.bool(), (0, extra), value=False)

    def encode_prefix(self, z_txt: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                      drop: torch.Tensor | None = None) -> Condition:
        """The condition of each row; dropped rows (B,) bool get the empty prompt's."""
        if tokens is None:
            raise ValueError("a published prior reads the caption's token states: keep model.module.use_token_states=true")
        tokens, mask = self.pad(tokens, mask)
        if drop is not None and bool(drop.any()):
            if self.null is None:
                raise ValueError("the empty prompt's condition is not set (PublishedPriorModule.set_null sets it from the CLIP)")
            null = self.null
            pick = drop.view(-1, 1)
            z_txt = torch.where(pick, null.z_txt.to(z_txt), z_txt)
            tokens = torch.where(pick[..., None], null.tokens.to(tokens), tokens)
            mask = torch.where(pick, null.mask.to(mask.device), mask)
        return Condition(z_txt, tokens, mask)

    # -------------------------------------------------------------------------------------- passes
    def denoise(self, cond: Condition, z_noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The predicted z_i (B, D) for noised z_i (B, D) at training steps t (B,)."""
        return self.prior(z_noisy, t, proj_embedding=cond.z_txt, encoder_hidden_states=cond.tokens,
                          attention_mask=cond.mask, return_dict=False)[0]

    def forward(self, z_noisy: torch.Tensor, t: torch.Tensor, z_txt: torch.Tensor, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.denoise(self.encode_prefix(z_txt, tokens, mask, drop), z_noisy, t)

    @staticmethod
    def repeat_prefix(cond: Condition, n: int) -> Condition:
        return Condition(cond.z_txt.repeat_interleave(n, 0), cond.tokens.repeat_interleave(n, 0),
                         cond.mask.repeat_interleave(n, 0))

    @staticmethod
    def cat_prefix(a: Condition, b: Condition) -> Condition:
        return Condition(torch.cat([a.z_txt, b.z_txt]), torch.cat([a.tokens, b.tokens]), torch.cat([a.mask, b.mask]))
