"""A published super-resolution net (karlo's 64 -> 256): two diffusers ``UNet2DModel``, behind the interface
:class:`unclip.modules.upsampler.UpsamplerModule` asks of its net, ``net(x_t, t, lowres=..., aug_level=None)``.

Karlo's improved upsampler (its model card) denoises with ``first`` at every step but the last and with
``last``, trained for that step alone, at the final one; diffusers' ``UnCLIPPipeline`` does the same. The net
sees only the timestep, so it picks by it: ``last`` for training steps at or below ``last_step`` (0, the final
step of every spacing that ends at the data: linspace, the published one, and ddim), ``first`` above. Each
UNet reads the noisy image concatenated with the low-res condition upsampled to its size (6 channels) and
predicts eps (3 channels; 6 with a learned variance).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from unclip.nets.layers import net_config


@dataclass
class DiffusersUpsamplerConfig:
    first: dict = field(default_factory=dict)  # diffusers UNet2DModel config of super_res_first (plain)
    last: dict = field(default_factory=dict)   # ... of super_res_last
    image_size: int = 256                      # the target size (the UNets' sample_size)
    last_step: int = 0                         # training steps <= this go to ``last``

    # what UpsamplerModule reads of a net's config
    @property
    def in_channels(self) -> int:  # image channels: the UNet reads twice as many (noisy image + condition)
        return int(self.first.get("in_channels", 6)) // 2

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def channel_mult(self) -> list[int]:  # one entry per level: the size must divide by 2 ** (levels - 1)
        channels = list(self.first.get("block_out_channels", [64]))
        return [c // channels[0] for c in channels]


class DiffusersUpsampler(nn.Module):
    def __init__(self, config: DiffusersUpsamplerConfig | dict):
        super().__init__()
        from diffusers import UNet2DModel  # an optional dependency: only published stages need it

        self.config = c = net_config(DiffusersUpsamplerConfig, config)
        self.first, self.last = UNet2DModel(**c.first), UNet2DModel(**c.last)
        for name, unet in (("first", self.first), ("last", self.last)):
            if unet.config.in_channels != 2 * c.in_channels or unet.config.out_channels not in (c.in_channels, 2 * c.in_channels):
                raise ValueError(f"super_res_{name} maps {unet.config.in_channels} channels to {unet.config.out_channels}; "
                                 f"expected {2 * c.in_channels} (noisy image + low-res condition) to {c.in_channels} (eps), "
                                 f"the same as super_res_first")
        if self.first.config.out_channels != self.last.config.out_channels:
            raise ValueError("super_res_first and super_res_last predict different numbers of channels")

    def hparams(self) -> dict:
        return asdict(self.config)

    @property
    def learn_sigma(self) -> bool:
        return int(self.first.config.out_channels) == 2 * self.config.in_channels

    def forward(self, x: torch.Tensor, t: torch.Tensor, lowres: torch.Tensor | None = None,
                aug_level: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) noisy image; t: (B,) training steps; lowres: (B, 3, H, W) the low-res image already
        upsampled to x's size. Rows of a batch may mix steps for both UNets (training)."""
        if aug_level is not None:
            raise ValueError("karlo's super-resolution nets take no noise-augmentation level (noise_aug: null)")
        if lowres is None or lowres.shape != x.shape:
            raise ValueError(f"lowres must be {tuple(x.shape)} (the low-res image upsampled to x's size), "
                             f"got {None if lowres is None else tuple(lowres.shape)}")
        h = torch.cat([x, lowres], dim=1)
        final = t <= self.config.last_step  # (B,)
        if bool(final.all()) or not bool(final.any()):
            unet = self.last if bool(final.all()) else self.first
            return unet(h, t, return_dict=False)[0]
        out = self.first(h[~final], t[~final], return_dict=False)[0]
        whole = out.new_empty(len(x), *out.shape[1:])
        whole[~final] = out
        whole[final] = self.last(h[final], t[final], return_dict=False)[0]
        return whole
