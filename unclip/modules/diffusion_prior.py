"""The diffusion prior (unCLIP §2.2): a causal transformer denoises a normalised z_i, trained with MSE on
the clean z_i (``diffusion.prediction=x0``, the paper's choice; ``eps`` and ``v`` are options), the
caption dropped with probability ``cond_drop_prob`` for classifier-free guidance. Sampling: DDIM (64
steps by default), guidance, and best-of-n: draw n and keep the one with the highest z_i . z_t (the
paper uses n = 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.diffusion import GaussianDiffusion, Sampler, classifier_free_guidance
from unclip.modules.prior import PriorModule, with_text_width
from unclip.nets.prior_transformer import PriorTransformer


class DiffusionPriorModule(PriorModule):
    kind = "diffusion_prior"
    aliases = ("diffusion",)
    colormap = "Blues"
    net_class = PriorTransformer  # the denoiser; a subclass may bring another (forward, encode_prefix, denoise, *_prefix)

    def __init__(self, net: dict, diffusion: dict, sampler: dict, cond_drop_prob: float = 0.1, best_of: int = 2,
                 clip=None, use_token_states: bool = True, val_pool: int = 1000, optim: dict | None = None, seed: int = 0):
        net = with_text_width(net, clip, use_token_states)
        super().__init__(net["embed_dim"], clip=clip, use_token_states=use_token_states, val_pool=val_pool,
                         optim=optim, seed=seed)
        self.net = self.net_class(net)
        self.diffusion = GaussianDiffusion.from_config(**diffusion)
        self.sampler = Sampler(**sampler)
        self.cond_drop_prob, self.best_of = cond_drop_prob, best_of
        self.save_hyperparameters({"kind": self.kind, "net": self.net.hparams(), "diffusion": dict(diffusion),
                                   "sampler": dict(sampler), "cond_drop_prob": cond_drop_prob, "best_of": best_of,
                                   "use_token_states": use_token_states})

    def trainable_parameters(self):
        return self.net.parameters()

    def loss(self, batch: dict) -> torch.Tensor:
        cond = self.condition(batch)
        x0 = self.normalise_img(batch["img_emb"].float())  # (B, D)
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x0),), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        drop = torch.rand(len(x0), device=self.device) < (self.cond_drop_prob if self.training else 0.0)
        output = self.net(x_t, t, cond["z_txt"], cond["tokens"], cond["mask"], drop)
        return self.diffusion.training_loss(output, x0, x_t, t, noise).mean()

    @torch.no_grad()
    def sample(self, cond: dict, generator: torch.Generator | None = None, guidance_scale: float | None = None,
               best_of: int | None = None, steps: int | str | None = None, negative: dict | None = None) -> torch.Tensor:
        """ẑ_i (B, D), unit norm, for the condition of :meth:`condition`. ``negative``: another condition
        whose prediction replaces the unconditional one in guidance (a negative prompt)."""
        scale = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        n = self.best_of if best_of is None else best_of
        b = len(cond["z_txt"])
        repeat_prefix, cat_prefix = self.net.repeat_prefix, self.net.cat_prefix
        prefix = repeat_prefix(self.net.encode_prefix(cond["z_txt"], cond["tokens"], cond["mask"]), n)
        if scale != 1.0:
            if negative is None:
                drop = torch.ones(b, dtype=torch.bool, device=self.device)
                uncond = self.net.encode_prefix(cond["z_txt"], cond["tokens"], cond["mask"], drop)
            else:
                uncond = self.net.encode_prefix(negative["z_txt"], negative["tokens"], negative["mask"])
            pair = cat_prefix(prefix, repeat_prefix(uncond, n))
            model_fn = classifier_free_guidance(lambda x, t: self.net.denoise(pair, x, t), scale)
        else:
            model_fn = lambda x, t: self.net.denoise(prefix, x, t)  # noqa: E731
        x_T = torch.randn(b * n, self.net.config.embed_dim, generator=generator, device=self.device)
        z = F.normalize(self.denormalise_img(self.sampler(model_fn, self.diffusion, x_T, generator, steps)), dim=-1)
        z = z.view(b, n, -1)
        # best-of-n (unCLIP §2.2): the draw most similar to the caption's z_t
        score = (z * F.normalize(cond["z_txt_raw"], dim=-1)[:, None]).sum(-1)
        return z[torch.arange(b, device=z.device), score.argmax(1)]
