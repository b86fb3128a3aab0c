"""A published super-resolution stage (karlo's 64 -> 256) as an unclip upsampler: ``python -m unclip.convert
kind=karlo`` writes it, ``unclip.load`` opens it, ``UnCLIPPipeline(upsamplers=[...])`` and ``sample.py upsampler=``
run it after any decoder.

Everything but the net is :class:`UpsamplerModule`'s own (diffusion, samplers, the condition channels,
validation, fine-tuning); the net is karlo's pair of UNets, first for every step but the last
(:mod:`unclip.nets.diffusers_upsampler`). The low-res image is enlarged as diffusers' ``UnCLIPPipeline`` does,
antialiased bicubic (``upsample: bicubic_aa``), with no noise augmentation.
"""

from __future__ import annotations

from unclip.modules.upsampler import UpsamplerModule
from unclip.nets.diffusers_upsampler import DiffusersUpsampler


class PublishedUpsamplerModule(UpsamplerModule):
    kind = "published_upsampler"

    def __init__(self, net: dict, diffusion: dict, sampler: dict, lowres_size: int, crop_size: int | None = None,
                 downsample: str = "bicubic", upsample: str = "bicubic_aa", degradation: dict | None = None,
                 val_images: int = 100, grid_images: int = 8, clip=None, optim: dict | None = None, seed: int = 0,
                 source: str = ""):
        super().__init__(net, diffusion, sampler, lowres_size, crop_size=crop_size, downsample=downsample, upsample=upsample,
                         degradation=degradation, noise_aug=None, residual=False, val_images=val_images,
                         grid_images=grid_images, clip=clip, optim=optim, seed=seed)
        self.hparams.update({"source": source})

    def build_net(self, net: dict, diffusion: dict) -> DiffusersUpsampler:
        upsampler = DiffusersUpsampler(net)
        if upsampler.learn_sigma != (diffusion.get("variance") == "learned_range"):
            raise ValueError(f"the super-resolution UNets output {upsampler.first.config.out_channels} channels but "
                             f"diffusion.variance is {diffusion.get('variance')!r}: twice the image channels go with "
                             f"learned_range, as many with a fixed variance")
        return upsampler
