"""A DALLE2-pytorch diffusion prior (LAION's released priors) as an unclip stage: ``python -m unclip.convert
kind=dalle2_pytorch_prior`` writes it, ``unclip.load`` opens it, ``train.py model=dalle2_pytorch_prior
init_from=...`` fine-tunes it and evaluation ranks it beside the priors trained here.

Everything but the net is :class:`DiffusionPriorModule`'s own: the diffusion process (the config's betas
and parameterisation), the samplers, classifier-free guidance and best-of-n (DALLE2-pytorch's ``sample``
also keeps the best of 2 by z_i . z_t). The net is :mod:`unclip.nets.dalle2_prior`, whose null branch is
learned. The normalisation buffers are the published prior's, kept when fine-tuning (``keeps_stats``):
z_i is scaled by ``image_embed_scale`` (sqrt(dim), Crowson's suggestion in DALLE2-pytorch), i.e.
``img_std = 1 / image_embed_scale``; z_t enters as it is (unit norm).
"""

from __future__ import annotations

import torch

from unclip.modules.diffusion_prior import DiffusionPriorModule
from unclip.nets.dalle2_prior import Dalle2Prior


class Dalle2PriorModule(DiffusionPriorModule):
    kind = "dalle2_pytorch_prior"
    aliases = ("dalle2",)
    colormap = "Purples"
    net_class = Dalle2Prior
    keeps_stats = True

    def __init__(self, net: dict, diffusion: dict, sampler: dict, cond_drop_prob: float = 0.1, best_of: int = 2,
                 clip=None, use_token_states: bool = True, val_pool: int = 1000, optim: dict | None = None, seed: int = 0,
                 source: str = "dalle2_pytorch_prior"):
        super().__init__(net, diffusion, sampler, cond_drop_prob=cond_drop_prob, best_of=best_of, clip=clip,
                         use_token_states=use_token_states, val_pool=val_pool, optim=optim, seed=seed)
        self.hparams.update({"kind": self.kind, "source": source})

    @torch.no_grad()
    def sample(self, cond: dict, generator: torch.Generator | None = None, guidance_scale: float | None = None,
               **settings) -> torch.Tensor:
        scale = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        if scale != 1.0 and self.cond_drop_prob <= 0:
            # DALLE2-pytorch refuses it too: its null embeddings were never trained
            raise ValueError(f"this prior was trained without condition dropout (cond_drop_prob=0), so its null branch "
                             f"is untrained and guidance_scale={scale} is meaningless; sample with guidance_scale=1")
        return super().sample(cond, generator, guidance_scale=scale, **settings)
