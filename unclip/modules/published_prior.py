"""A published diffusion prior (karlo, Kandinsky 2.2) as an unclip stage: ``python -m unclip.convert``
writes it, ``unclip.load`` opens it, ``train.py model=published_prior init_from=...`` fine-tunes it and
evaluation ranks it beside the priors trained here.

Everything but the net is :class:`DiffusionPriorModule`'s own: the diffusion process (the published
scheduler's betas and parameterisation), the samplers, classifier-free guidance and best-of-n. Two things
differ. The net is diffusers' ``PriorTransformer`` (:mod:`unclip.nets.diffusers_prior`), whose dropped
caption is the empty prompt's encoding by the CLIP, not a learned vector. And the normalisation buffers are
the published prior's (``clip_mean``/``clip_std`` for z_i, none for z_t), so a cache's own stats never
replace them (``keeps_stats``): the net only knows the space it was trained in.
"""

from __future__ import annotations

import torch

from unclip.modules.diffusion_prior import DiffusionPriorModule
from unclip.nets.diffusers_prior import Condition, DiffusersPrior


class PublishedPriorModule(DiffusionPriorModule):
    kind = "published_prior"
    aliases = ("published",)
    colormap = "Greens"
    net_class = DiffusersPrior
    keeps_stats = True

    def __init__(self, net: dict, diffusion: dict, sampler: dict, cond_drop_prob: float = 0.1, best_of: int = 1,
                 clip=None, use_token_states: bool = True, val_pool: int = 1000, optim: dict | None = None, seed: int = 0,
                 source: str = "", null_prompt: str = ""):
        if not use_token_states:
            raise ValueError("a published prior reads the caption's token states: keep model.module.use_token_states=true")
        super().__init__(net, diffusion, sampler, cond_drop_prob=cond_drop_prob, best_of=best_of, clip=clip,
                         use_token_states=use_token_states, val_pool=val_pool, optim=optim, seed=seed)
        self.null_prompt = null_prompt
        self.hparams.update({"kind": self.kind, "source": source, "null_prompt": null_prompt})

    def set_null(self) -> None:
        """The unconditional branch's condition: the CLIP's encoding of ``null_prompt`` ("" as the published
        pipelines), normalised as every caption is; computed once."""
        if self.net.null is not None:
            return
        if self.clip is None:
            raise ValueError("a published prior needs its CLIP for the empty prompt's condition; load it with clip=")
        text = self.clip.encode_text([self.null_prompt])
        z_txt = (text.z_txt.float().to(self.txt_mean.device) - self.txt_mean) / self.txt_std
        tokens, mask = self.net.pad(text.tokens.float().to(z_txt.device), text.mask.to(z_txt.device))
        self.net.null = Condition(z_txt, tokens, mask)

    def loss(self, batch: dict) -> torch.Tensor:
        self.set_null()
        return super().loss(batch)

    @torch.no_grad()
    def sample(self, cond: dict, generator: torch.Generator | None = None, **settings) -> torch.Tensor:
        self.set_null()
        return super().sample(cond, generator, **settings)
