"""The linear prior's LightningModule: MSE to the normalised z_i, and Gaussian noise of a chosen scale at
sampling time (its one knob, swept by the leaderboard through the ``eval:`` block of its config)."""

import torch
import torch.nn.functional as F

from fourth_prior.net import LinearPriorNet
from unclip.modules.prior import PriorModule


class LinearPriorModule(PriorModule):
    kind = "linear_prior"

    def __init__(self, embed_dim: int, noise: float = 0.0, clip=None, use_token_states: bool = False,
                 val_pool: int = 1000, optim: dict | None = None, seed: int = 0):
        super().__init__(embed_dim, clip=clip, use_token_states=use_token_states, val_pool=val_pool, optim=optim, seed=seed)
        self.net, self.noise = LinearPriorNet(embed_dim), noise
        self.save_hyperparameters({"kind": self.kind, "embed_dim": embed_dim, "noise": noise,
                                   "use_token_states": use_token_states})

    def loss(self, batch: dict) -> torch.Tensor:
        cond = self.condition(batch)
        return F.mse_loss(self.net(cond["z_txt"]), self.normalise_img(batch["img_emb"].float()))

    @torch.no_grad()
    def sample(self, cond: dict, generator: torch.Generator | None = None, noise: float | None = None, **_unused) -> torch.Tensor:
        pred = self.net(cond["z_txt"])
        scale = self.noise if noise is None else noise
        if scale:
            pred = pred + scale * torch.randn(pred.shape, generator=generator, device=pred.device)
        return F.normalize(self.denormalise_img(pred), dim=-1)
