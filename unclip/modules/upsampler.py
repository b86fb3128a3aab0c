"""The diffusion upsamplers p(x | low-res x) (unCLIP §2.1, App. A: 64 -> 256 and 256 -> 1024).

No text, no CLIP embedding: the UNet sees the noisy high-res image concatenated with the low-res condition,
upsampled (bicubic) to its size. The condition is made on the fly from each high-res training image, so no
extra shards are needed: downsample (bicubic with antialiasing, as the DataModule's ``image_lowres``), corrupt
(``unclip.degradations``: Gaussian blur for the first upsampler, BSR-lite for the second), then noise it to
a random level t_aug of the module's own diffusion with ``q_sample`` (Imagen §2.5 conditioning augmentation);
the net is told t_aug through an embedding added to its timestep embedding. At sampling the level is fixed
(``noise_aug.sample_step``). With ``residual`` the process diffuses x0 minus the bicubic upsampling of the
(corrupted, un-noised) low-res image instead of x0 itself (SRDiff, Li et al. 2022): an x0-predicting net then
starts at bicubic's answer and only learns what bicubic misses, which a few CPU minutes can teach.

unCLIP trains its upsamplers on random crops at a fraction of the target size and samples at full size with
the same weights: the net has no attention (convolutions only). A crop is cut from the high-res image and, at
the same place, from the upsampled condition of the *whole* image, offsets on the low-res pixel grid, so a
crop sees exactly what the net sees of a full image at sampling.

``image_cond`` also conditions on the CLIP image embedding z_i, added to the timestep embedding as in the
decoder (unCLIP §2.1; convolutions only, so no context tokens), dropped ``image_drop_prob`` of the time so
that it also upsamples without one. unCLIP's upsamplers see only pixels; DALLE2-pytorch's also read z_i. On
shapes it changes nothing measurable: the upsampler follows the outline its low-res input shows (README,
"Upsamplers").

Validation upsamples clean downsampled val images and logs PSNR and SSIM against the true high-res image
next to the same scores of plain bicubic upsampling (``val/upsampler/{psnr,ssim}[_bicubic][_unseen]``), plus
a grid: bicubic / sample / truth.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from unclip.seeding import hash_seed
from unclip.degradations import resize
from unclip.diffusion import GaussianDiffusion, Sampler
from unclip.modules.base import UnclipModule
from unclip.modules.decoder import scaled_embedding
from unclip.nets.unet import UNet


def aligned_offsets(n: int, size: int, crop: int, factor: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 2) random (top, left) crop corners in high-res pixels, multiples of ``factor`` (the low-res grid)."""
    if crop % factor:
        raise ValueError(f"crop_size {crop} must be a multiple of the scale factor {factor}")
    if crop > size:
        raise ValueError(f"crop_size {crop} is larger than the image size {size}")
    return torch.randint(0, (size - crop) // factor + 1, (n, 2), generator=generator) * factor


def crop(images: torch.Tensor, offsets: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size), sample b cut at ``offsets[b]`` = (top, left)."""
    return torch.stack([image[:, top:top + size, left:left + size] for image, (top, left) in zip(images, offsets.tolist())])


class UpsamplerModule(UnclipModule):
    kind = "upsampler"

    def __init__(self, net: dict, diffusion: dict, sampler: dict, lowres_size: int, crop_size: int | None = None,
                 downsample: str = "bicubic", upsample: str = "bicubic", degradation: dict | None = None,
                 noise_aug: dict | None = None, residual: bool = False, val_images: int = 100, grid_images: int = 8, clip=None,
                 optim: dict | None = None, seed: int = 0, image_cond: bool = False, image_drop_prob: float = 0.1):
        super().__init__(optim=optim, seed=seed)
        net = dict(net)
        self.image_cond, self.image_drop_prob = image_cond, image_drop_prob
        image_size = int(net["image_size"])
        if image_size % lowres_size:
            raise ValueError(f"the target size {image_size} (net.image_size) is not a multiple of lowres_size {lowres_size}")
        self.factor = image_size // lowres_size
        self.crop_size = crop_size or image_size
        aligned_offsets(1, image_size, self.crop_size, self.factor)  # fails now, not at the first step, on a bad crop
        self.noise_aug = dict(noise_aug) if noise_aug else None
        self.net = self.build_net(net, diffusion)
        self.diffusion = GaussianDiffusion.from_config(**diffusion)
        if self.noise_aug and not 0 <= self.noise_aug["sample_step"] <= self.noise_aug["max_step"] < self.diffusion.num_timesteps:
            raise ValueError(f"noise_aug needs 0 <= sample_step <= max_step < diffusion.num_timesteps "
                             f"({self.diffusion.num_timesteps}), got {self.noise_aug}")
        self.sampler = Sampler(**sampler)
        self.lowres_size, self.image_size = lowres_size, image_size
        self.downsample_mode, self.upsample_mode, self.residual = downsample, upsample, residual
        self.degrade = instantiate(degradation, _convert_="all") if degradation else None
        self.val_images, self.grid_images = val_images, grid_images
        self.save_hyperparameters({"kind": self.kind, "net": self.net.hparams(), "diffusion": dict(diffusion),
                                   "sampler": dict(sampler), "image_size": image_size, "lowres_size": lowres_size,
                                   "crop_size": self.crop_size, "downsample": downsample, "upsample": upsample,
                                   "degradation": dict(degradation) if degradation else None, "noise_aug": self.noise_aug,
                                   "residual": residual, "image_cond": image_cond, "image_drop_prob": image_drop_prob})
        self.val_store: dict[str, dict[str, list]] = {}

    def build_net(self, net: dict, diffusion: dict):
        """The denoiser, called ``net(x_t, t, lowres=..., aug_level=...)``, with ``image_cond`` also ``z_img=`` and
        ``drop_image=``: unclip's UNet with the low-res image as extra input channels and z_i added to t's embedding
        (a subclass may bring another net)."""
        if self.image_cond and not net.get("embed_dim"):
            raise ValueError("image_cond needs net.embed_dim, the CLIP embedding's dimension")
        net.update(embed_dim=int(net["embed_dim"]) if self.image_cond else 0, context_tokens=0, text_width=0,
                   lowres_channels=net.get("in_channels", 3),
                   learn_sigma=diffusion.get("variance") == "learned_range", aug_level_embed=self.noise_aug is not None)
        return UNet(net)

    def trainable_parameters(self):
        return self.net.parameters()

    def setup(self, stage: str) -> None:
        if self.image_cond:  # the checkpoint names the CLIP whose z_i it reads
            self.cache_meta()

    def image_condition(self, z_img: torch.Tensor | None, b: int, drop_prob: float = 0.0) -> dict:
        """The net's z_i arguments for a batch of ``b`` (none without ``image_cond``): z_i as the net reads it and
        which rows drop it, ``drop_prob`` of them; without ``z_img`` every row takes the learned null embedding."""
        if not self.image_cond:
            return {}
        if z_img is None:
            return {"z_img": torch.zeros(b, self.net.config.embed_dim, device=self.device),
                    "drop_image": torch.ones(b, dtype=torch.bool, device=self.device)}
        return {"z_img": scaled_embedding(z_img.to(self.device)), "drop_image": torch.rand(b, device=self.device) < drop_prob}

    # ------------------------------------------------------------------------------- conditioning
    def lowres_of(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) high-res -> (B, 3, H / f, W / f) clean low-res, the way the condition is made in training."""
        return resize(images, (images.shape[-2] // self.factor, images.shape[-1] // self.factor), self.downsample_mode)

    def base(self, lowres: torch.Tensor) -> torch.Tensor:
        """The plain upsampled low-res image (B, 3, f h, f w): bicubic's answer, which a ``residual`` upsampler
        diffuses the difference to (SRDiff, Li et al. 2022)."""
        return resize(lowres, (lowres.shape[-2] * self.factor, lowres.shape[-1] * self.factor), self.upsample_mode)

    def condition(self, lowres: torch.Tensor, aug_level: torch.Tensor | None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """The net's extra input channels: ``lowres`` (B, 3, h, w) noised to ``aug_level`` (B,) with the
        diffusion's q_sample (no noise when augmentation is off), upsampled to (B, 3, f h, f w)."""
        if aug_level is not None:
            noise = torch.randn(lowres.shape, generator=generator, device=lowres.device, dtype=lowres.dtype)
            lowres = self.diffusion.q_sample(lowres, aug_level, noise)
        return resize(lowres, (lowres.shape[-2] * self.factor, lowres.shape[-1] * self.factor), self.upsample_mode, clamp=False)

    def training_pair(self, images: torch.Tensor, degrade: bool = True) -> dict[str, torch.Tensor]:
        """From high-res images (B, 3, H, W): the target crop ``x0`` (B, 3, c, c), the condition crop ``cond``
        at the same place, the low-res crop ``lowres`` (B, 3, c/f, c/f) it came from (after corruption, before
        noise augmentation), the augmentation level ``aug_level`` (B,) or None, the crops' high-res corners
        ``offsets`` (B, 2), and the diffused target ``target``: ``x0``, or ``x0`` minus the upsampled low-res
        crop for a ``residual`` upsampler."""
        b = len(images)
        offsets = aligned_offsets(b, images.shape[-1], self.crop_size, self.factor)  # drawn first: corruption never moves a crop
        aug_level = (torch.randint(0, self.noise_aug["max_step"] + 1, (b,), device=images.device)
                     if self.noise_aug else None)
        lowres = self.lowres_of(images)
        if degrade and self.degrade is not None:
            lowres = self.degrade(lowres)
        cond = self.condition(lowres, aug_level)
        x0 = crop(images, offsets, self.crop_size)
        target = x0 - crop(self.base(lowres), offsets, self.crop_size) if self.residual else x0
        return {"x0": x0, "target": target, "cond": crop(cond, offsets, self.crop_size),
                "lowres": crop(lowres, offsets // self.factor, self.crop_size // self.factor), "aug_level": aug_level,
                "offsets": offsets}

    # ---------------------------------------------------------------------------------- training
    def loss(self, batch: dict) -> torch.Tensor:
        pair = self.training_pair(batch["image"], degrade=self.training)  # validation: the clean condition
        x0 = pair["target"]
        t = torch.randint(0, self.diffusion.num_timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        z = self.image_condition(batch.get("img_emb"), len(x0), self.image_drop_prob if self.training else 0.0)
        output = self.net(x_t, t, lowres=pair["cond"], aug_level=pair["aug_level"], **z)
        return self.diffusion.training_loss(output, x0, x_t, t, noise).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]))
        return loss

    # ---------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def upsample(self, lowres: torch.Tensor, steps: int | str | None = None, generator: torch.Generator | None = None,
                 aug_level: int | None = None, x_T: torch.Tensor | None = None, eta: float | None = None,
                 z_img: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, h, w) in [-1, 1] -> (B, 3, f h, f w) in [-1, 1], f = image_size / lowres_size. Any h, w whose
        upsampled size the UNet's levels divide works (the net is convolutional); ``lowres_size`` is the size
        it was trained for. ``aug_level`` overrides ``noise_aug.sample_step``; ``steps`` the sampler's steps;
        ``z_img`` (B, D) the CLIP image embeddings the images were decoded from (``image_cond`` upsamplers)."""
        if lowres.dim() != 4 or lowres.shape[1] != self.net.config.in_channels:
            raise ValueError(f"lowres must be (B, {self.net.config.in_channels}, h, w), got {tuple(lowres.shape)}")
        divisor = 2 ** (len(self.net.config.channel_mult) - 1)
        size = (lowres.shape[-2] * self.factor, lowres.shape[-1] * self.factor)
        if size[0] % divisor or size[1] % divisor:
            raise ValueError(f"the upsampled size {size} must be divisible by {divisor} (the UNet's downsampling)")
        lowres = lowres.to(self.device, torch.float32)
        b = len(lowres)
        if x_T is None:
            x_T = torch.randn(b, self.net.config.out_channels, *size, generator=generator, device=self.device)
        level = None
        if self.noise_aug is not None:
            step = self.noise_aug["sample_step"] if aug_level is None else int(aug_level)
            level = torch.full((b,), step, dtype=torch.long, device=self.device)
        elif aug_level:
            raise ValueError("this upsampler was trained without noise augmentation (noise_aug: null); aug_level must be None")
        cond = self.condition(lowres, level, generator)
        z = self.image_condition(z_img, b)
        model_fn = lambda x, t: self.net(x, t, lowres=cond, aug_level=level, **z)  # noqa: E731
        sample = self.sampler(model_fn, self.diffusion, x_T, generator, steps, eta)
        return (sample + self.base(lowres) if self.residual else sample).clamp(-1, 1)

    # -------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.log_val_loss(batch, batch_idx, dataloader_idx)
        store = self.val_store.setdefault(self.split_suffix(dataloader_idx), {"truth": [], "sample": [], "bicubic": []})
        keep = min(len(batch["key"]), self.val_images - sum(len(x) for x in store["truth"]))
        if keep <= 0:
            return
        truth = batch["image"][:keep].float()
        lowres = self.lowres_of(truth)
        generator = torch.Generator(device=self.device).manual_seed(hash_seed(self.seed, "val-sample", dataloader_idx, batch_idx))
        z_img = batch["img_emb"][:keep] if "img_emb" in batch else None  # read by image_cond upsamplers only
        store["sample"].append(self.upsample(lowres, generator=generator, z_img=z_img))
        store["bicubic"].append(resize(lowres, truth.shape[-2:], "bicubic"))
        store["truth"].append(truth)

    def on_validation_epoch_end(self) -> None:
        from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

        for suffix, store in self.val_store.items():
            truth, sample, bicubic = (torch.cat(store[k]).add(1).div(2).clamp(0, 1) for k in ("truth", "sample", "bicubic"))
            for name, estimate in (("", sample), ("_bicubic", bicubic)):
                # per-image PSNR averaged over images (dim=(1, 2, 3)), as super-resolution papers report it
                psnr = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)).to(truth.device)
                ssim = StructuralSimilarityIndexMeasure(data_range=1.0).to(truth.device)
                self.log(f"val/upsampler/psnr{name}{suffix}", psnr(estimate, truth), add_dataloader_idx=False)
                self.log(f"val/upsampler/ssim{name}{suffix}", ssim(estimate, truth), add_dataloader_idx=False)
            n = min(self.grid_images, len(truth))
            self.save_image_rows([x[:n].mul(2).sub(1) for x in (bicubic, sample, truth)], f"val{suffix}")
        self.val_store = {}
