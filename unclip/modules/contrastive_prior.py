"""The contrastive prior (ECLIPSE, Patel et al. 2023, arXiv 2312.04655): the diffusion prior's
transformer, trained to predict z_i in one forward pass from the caption instead of denoising it.

ECLIPSE's objective: L = L_proj + λ · L_CLIP, with L_proj = ||ẑ_i − z_i||² (here in the cache-normalised
space the other priors use) and L_CLIP a contrastive loss that makes ẑ_i pick out its own caption's z_t
among the batch (open_clip's symmetric ``ClipLoss`` over L2-normalised ẑ_i and z_t, learnable logit scale
initialised at 1/0.07 as in CLIP, or a fixed temperature). The MSE term alone regresses to the mean of
p(z_i | caption); the contrastive term keeps predictions of different captions apart. ECLIPSE reports that
feeding noise to such a prior hurts, so the net's timestep and noised-z_i slots hold constants (timestep 0,
a zero vector): they become two learned bias tokens, and ``PriorTransformer`` is reused as it is.

The caption is dropped with probability ``cond_drop_prob`` (its MSE then fits the unconditional mean), so
sampling can guide: ẑ = uncond + s · (cond − uncond), cond and uncond rows in one batched forward pass.
Sampling is deterministic: the generator is accepted for the shared protocol and unused.
"""

from __future__ import annotations

import math

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip.modules.prior import PriorModule, with_text_width
from unclip.nets.prior_transformer import PriorTransformer

FIXED_TIMESTEP = 0  # the constant fed to the net's timestep slot (no diffusion: any constant would do)


class ContrastivePriorModule(PriorModule):
    kind = "contrastive_prior"
    aliases = ("contrastive",)
    colormap = "Greens"

    def __init__(self, net: dict, contrastive_weight: float = 0.2, temperature: float = 0.07,
                 learn_temperature: bool = True, max_logit_scale: float = 100.0, guidance_scale: float = 1.0,
                 cond_drop_prob: float = 0.1, clip=None, use_token_states: bool = True, val_pool: int = 1000,
                 optim: dict | None = None, seed: int = 0):
        net = with_text_width(net, clip, use_token_states)
        super().__init__(net["embed_dim"], clip=clip, use_token_states=use_token_states, val_pool=val_pool,
                         optim=optim, seed=seed)
        if temperature <= 0:
            raise ValueError(f"contrastive temperature must be positive, got {temperature}")
        self.net = PriorTransformer(net)
        self.contrastive_weight, self.guidance_scale, self.cond_drop_prob = contrastive_weight, guidance_scale, cond_drop_prob
        self.learn_temperature, self.max_logit_scale = learn_temperature, max_logit_scale
        # CLIP's parameterisation: log of the logit scale 1/τ, learnable, clamped at max_logit_scale
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learn_temperature:
            self.log_logit_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_logit_scale", log_scale)
        # in-batch negatives only, also under DDP: each rank contrasts its own batch (no feature gather,
        # which would need equal row counts per rank after dropping captions)
        self.clip_loss = open_clip.ClipLoss()
        self.save_hyperparameters({"kind": self.kind, "net": self.net.hparams(), "contrastive_weight": contrastive_weight,
                                   "temperature": temperature, "learn_temperature": learn_temperature,
                                   "max_logit_scale": max_logit_scale, "guidance_scale": guidance_scale,
                                   "cond_drop_prob": cond_drop_prob, "use_token_states": use_token_states})

    def trainable_parameters(self):
        return [*self.net.parameters(), *([self.log_logit_scale] if self.learn_temperature else [])]

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    # --------------------------------------------------------------------------------- prediction
    def predict(self, z_txt: torch.Tensor, tokens: torch.Tensor | None, mask: torch.Tensor | None,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        """ẑ_i (B, D) in the normalised space from one pass of the net: z_txt (B, D) normalised, tokens
        (B, L, W) with mask (B, L), drop (B,) bool (caption dropped)."""
        b = len(z_txt)
        slot = torch.zeros(b, self.net.config.embed_dim, dtype=z_txt.dtype, device=z_txt.device)
        t = torch.full((b,), FIXED_TIMESTEP, dtype=torch.long, device=z_txt.device)
        return self.net(slot, t, z_txt, tokens, mask, drop)

    # ----------------------------------------------------------------------------------- training
    def loss(self, batch: dict) -> torch.Tensor:
        cond = self.condition(batch)
        x0 = self.normalise_img(batch["img_emb"].float())  # (B, D)
        drop = torch.rand(len(x0), device=self.device) < (self.cond_drop_prob if self.training else 0.0)
        pred = self.predict(cond["z_txt"], cond["tokens"], cond["mask"], drop)
        mse = F.mse_loss(pred, x0)
        # contrast in CLIP space, over the rows that kept their caption (a dropped row has none to match)
        keep = ~drop
        if int(keep.sum()) > 1:
            z_pred = F.normalize(self.denormalise_img(pred[keep]), dim=-1)
            z_txt = F.normalize(cond["z_txt_raw"][keep], dim=-1)
            contrastive = self.clip_loss(z_pred, z_txt, self.logit_scale())
        else:
            contrastive = pred.new_zeros(())
        if self.training:
            size = len(x0)
            self.log("train/mse", mse, batch_size=size)
            self.log("train/contrastive", contrastive, batch_size=size)
            self.log("train/logit_scale", self.logit_scale().detach(), batch_size=size)
        return mse + self.contrastive_weight * contrastive

    # ----------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(self, cond: dict, generator: torch.Generator | None = None, guidance_scale: float | None = None,
               negative: dict | None = None, **_unused) -> torch.Tensor:
        """ẑ_i (B, D), unit norm, from one forward pass. ``negative``: another condition whose prediction
        replaces the unconditional one in guidance (a negative prompt)."""
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        z_txt, tokens, mask = cond["z_txt"], cond["tokens"], cond["mask"]
        if scale == 1.0:
            pred = self.predict(z_txt, tokens, mask)
        else:
            b = len(z_txt)
            other = cond if negative is None else negative
            drop = torch.zeros(2 * b, dtype=torch.bool, device=z_txt.device)
            if negative is None:
                drop[b:] = True  # unconditional rows: the caption dropped as in training
            tokens, mask = cat_tokens(tokens, mask, other["tokens"], other["mask"])
            both = self.predict(torch.cat([z_txt, other["z_txt"]]), tokens, mask, drop)
            cond_pred, uncond_pred = both.chunk(2)
            pred = uncond_pred + scale * (cond_pred - uncond_pred)  # classifier-free guidance (Ho & Salimans 2022)
        return F.normalize(self.denormalise_img(pred), dim=-1)


def cat_tokens(tokens_a, mask_a, tokens_b, mask_b):
    """Batch-concatenation of two captions' token states (B, L, W) and masks (B, L), padding the shorter
    to the longer length (padding is masked out, so it changes nothing)."""
    if tokens_a is None or tokens_b is None:
        return None, None
    length = max(tokens_a.shape[1], tokens_b.shape[1])

    def pad(tokens, mask):
        extra = length - tokens.shape[1]
        return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)

    (tokens_a, mask_a), (tokens_b, mask_b) = pad(tokens_a, mask_a), pad(tokens_b, mask_b)
    return torch.cat([tokens_a, tokens_b]), torch.cat([mask_a, mask_b])
