"""The decoder p(x | z_i, caption) (unCLIP §2.1): a diffusion UNet conditioned on the CLIP image
embedding (added to the timestep embedding and projected into 4 context tokens), optionally on the
caption's token states. Classifier-free guidance by dropping z_i 10 % and the caption 50 % of the time
during training. Validation decodes the val images' own z_i and scores the result with the run's
frozen CLIP: ``val/decoder/clip_sim`` = cos(CLIP(x̂), z_i), next to the same score for the real images
at the decoder's resolution, plus zero-shot shape/colour accuracy of the decoded images.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from unclip.seeding import hash_seed
from unclip.diffusion import GaussianDiffusion, Sampler, composed_guidance, ddim_invert
from unclip.modules.base import UnclipModule
from unclip.modules.clip_pretrain import zero_shot_attributes
from unclip.modules.prior import cached_token_states, trim_padding
from unclip.nets.unet import UNet

log = logging.getLogger(__name__)


def scaled_embedding(z_img: torch.Tensor) -> torch.Tensor:
    """z_i as a net reads it: the unit-norm CLIP embedding scaled by sqrt(D), so its entries are ~unit variance."""
    return F.normalize(z_img.float(), dim=-1) * math.sqrt(z_img.shape[-1])


class DecoderModule(UnclipModule):
    kind = "decoder"

    def __init__(self, net: dict, diffusion: dict, sampler: dict, clip=None, text_cond: bool = False,
                 image_drop_prob: float = 0.1, text_drop_prob: float = 0.5, val_images: int = 16,
                 attribute_classifier: str | None = None, optim: dict | None = None, seed: int = 0,
                 image_noise: float = 0.0, caption_embedding: bool = False):
        super().__init__(optim=optim, seed=seed)
        if clip is None:
            raise ValueError("the decoder needs the run's frozen CLIP (model.needs_clip=true): it scores decoded images "
                             "and, with text_cond, encodes captions")
        self.clip, self.text_cond, self.caption_embedding = clip, text_cond, caption_embedding
        self.net = self.build_net(dict(net), diffusion)
        self.diffusion = GaussianDiffusion.from_config(**diffusion)
        self.sampler = Sampler(**sampler)
        self.image_drop_prob, self.text_drop_prob, self.val_images = image_drop_prob, text_drop_prob, val_images
        self.image_noise = image_noise
        self.save_hyperparameters({"kind": self.kind, "net": self.net.hparams(), "diffusion": dict(diffusion),
                                   "sampler": dict(sampler), "text_cond": text_cond, "image_drop_prob": image_drop_prob,
                                   "text_drop_prob": text_drop_prob, "image_noise": image_noise,
                                   "caption_embedding": caption_embedding})
        self.val_store: dict[str, dict[str, list]] = {}
        # the project's attribute classifier (python train_classifier.py), when trained: scores decoded val
        # images against the attributes of the images whose z_i they decode
        # (held in a plain dict: as a submodule it would land in every checkpoint)
        self.attribute_classifier_path, self.evaluators = attribute_classifier, {}

    def build_net(self, net: dict, diffusion: dict):
        """The denoiser, called ``net(x_t, t, z, tokens, mask, drop_image, drop_text)``: unclip's UNet, sized for
        the CLIP's caption tokens and the diffusion's variance (a subclass may bring another net)."""
        net["text_width"] = self.clip.text_width if self.text_cond else 0
        net["caption_vocab"] = self.clip.vocab_size if self.text_cond and self.caption_embedding else 0
        net["learn_sigma"] = diffusion.get("variance") == "learned_range"
        return UNet(net)

    def trainable_parameters(self):
        return self.net.parameters()

    def setup(self, stage: str) -> None:
        self.cache_meta()

    def on_fit_start(self) -> None:
        self.clip.to(self.device)
        path = self.attribute_classifier_path
        if "attributes" not in self.evaluators and path:
            if Path(path).exists():
                from unclip.eval.attributes import load_classifier

                self.evaluators["attributes"] = load_classifier(path, self.device)
            else:
                log.info("no attribute classifier at %s (train one with python train_classifier.py): "
                         "val/decoder/attr_acc is not logged", path)
                self.attribute_classifier_path = None

    on_validation_start = on_fit_start

    # ------------------------------------------------------------------------------- conditioning
    def image_condition(self, z_img: torch.Tensor) -> torch.Tensor:
        return scaled_embedding(z_img)

    def noised_embedding(self, z_img: torch.Tensor) -> torch.Tensor:
        """Training only: the unit z_i moved off the data by Gaussian noise of a level drawn per sample, uniform in
        [0, image_noise] of its norm, so the decoder also learns from embeddings as approximate as a prior's
        draws (cos 1/sqrt(1 + level^2) to the true z_i: 0.89 at level 0.5) and leans on the caption where they
        are vague (conditioning augmentation, as Imagen §2.5 does for its upsamplers' low-res input)."""
        z = F.normalize(z_img.float(), dim=-1)
        level = torch.rand(len(z), 1, device=z.device) * self.image_noise
        return z + level * torch.randn_like(z) / math.sqrt(z.shape[-1])

    def text_condition(self, captions, cached: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The caption's token states (B, L, W) and mask, trimmed to the longest caption: the cache's
        (``txt_tok``, zero past each caption's end) when the batch has them, else the frozen text tower's."""
        if not self.text_cond:
            return None, None
        # token ids: tokenized once, for the text tower and the decoder's own caption embedding alike
        ids = None if cached is not None and not self.caption_embedding else self.clip.tokenize(list(captions))
        if cached is not None:
            tokens, mask = trim_padding(*cached_token_states(cached.to(self.device)))
        else:
            text = self.clip.encode_tokens(ids)
            tokens, mask = trim_padding(text.tokens.float().to(self.device), text.mask.to(self.device))
        if self.caption_embedding:
            tokens = self.net.caption_states(tokens, ids)
        return tokens, mask

    # ---------------------------------------------------------------------------------- training
    def loss(self, batch: dict) -> torch.Tensor:
        x0 = batch["image"]
        z_img = batch["img_emb"]
        z = self.image_condition(self.noised_embedding(z_img) if self.training and self.image_noise else z_img)
        tokens, mask = self.text_condition(batch["caption"], batch.get("txt_tok"))
        b = len(x0)
        t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=self.device)
        noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        p_img, p_txt = (self.image_drop_prob, self.text_drop_prob) if self.training else (0.0, 0.0)
        drop_image = torch.rand(b, device=self.device) < p_img
        drop_text = torch.rand(b, device=self.device) < p_txt
        output = self.net(x_t, t, z, tokens, mask, drop_image, drop_text)
        return self.diffusion.training_loss(output, x0, x_t, t, noise).mean()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]), sync_dist=True)
        return loss

    # ---------------------------------------------------------------------------------- sampling
    def model_fn(self, z_img: torch.Tensor, captions=None, guidance_scale: float | None = None):
        """The denoiser ``(x_t, t) -> output`` for embeddings z_img (B, D), with classifier-free guidance
        (the unconditional half drops z_i and the caption together) when the scale is not 1: a conjunction
        of one part (:meth:`composed_model_fn`)."""
        scale = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        if scale != 1.0:
            return self.composed_model_fn(z_img[None], torch.ones(1, len(z_img), device=self.device),
                                          None if captions is None else [list(captions)], scale)
        z = self.image_condition(z_img.to(self.device))
        tokens, mask = self.text_condition(captions) if captions is not None else (None, None)
        return lambda x, t: self.net(x, t, z, tokens, mask)

    def composed_model_fn(self, z_parts: torch.Tensor, weights: torch.Tensor, captions=None,
                          guidance_scale: float | None = None):
        """The denoiser for conjunctions (:func:`composed_guidance`): image b is guided towards each of its K parts,
        part k conditioned on z_parts[k, b] (K, B, D) and its caption captions[k][b], weighted by weights[k, b]."""
        scale = self.sampler.guidance_scale if guidance_scale is None else guidance_scale
        k, b = z_parts.shape[:2]
        z = self.image_condition(z_parts.flatten(0, 1).to(self.device))
        z = torch.cat([z, z[:b]])  # the unconditional rows drop z_i and the caption: any row's will do
        tokens, mask = (None, None) if captions is None else self.text_condition([c for part in captions for c in part])
        if tokens is not None:
            tokens, mask = torch.cat([tokens, tokens[:b]]), torch.cat([mask, mask[:b]])
        drop = torch.arange((k + 1) * b, device=self.device) >= k * b
        return composed_guidance(lambda x, t: self.net(x, t, z, tokens, mask, drop, drop), weights, scale,
                                 learned_variance=self.net.config.learn_sigma)

    @torch.no_grad()
    def sample(self, z_img: torch.Tensor, captions=None, generator: torch.Generator | None = None,
               guidance_scale: float | None = None, steps: int | str | None = None, x_T: torch.Tensor | None = None,
               eta: float | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] decoded from CLIP image embeddings z_img (B, D) and their captions; or,
        with ``weights`` (K, B), each image a conjunction of K parts: z_img (K, B, D) and K lists of B captions."""
        size = self.net.config.image_size
        if x_T is None:
            x_T = torch.randn(z_img.shape[-2], self.net.config.out_channels, size, size, generator=generator, device=self.device)
        model_fn = (self.model_fn(z_img, captions, guidance_scale) if weights is None
                    else self.composed_model_fn(z_img, weights, captions, guidance_scale))
        return self.sampler(model_fn, self.diffusion, x_T.to(self.device), generator, steps, eta).clamp(-1, 1)

    @torch.no_grad()
    def invert(self, images: torch.Tensor, z_img: torch.Tensor, captions=None, steps: int | str | None = None) -> torch.Tensor:
        """The DDIM latent x_T (B, 3, H, W) that decodes back to ``images`` (DDIM §4.3) under z_img,
        without guidance: the starting noise that keeps an image's layout in variations and interpolations."""
        size = self.net.config.image_size
        x0 = images.to(self.device).float()
        if x0.shape[-1] != size or x0.shape[-2] != size:
            x0 = F.interpolate(x0, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)
        process = self.sampler.process(self.diffusion, steps)
        return ddim_invert(self.model_fn(z_img, captions, 1.0), process, x0)

    # -------------------------------------------------------------------------------- validation
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        suffix = self.split_suffix(dataloader_idx)
        self.log_val_loss(batch, batch_idx, dataloader_idx)
        store = self.val_store.setdefault(suffix, {"real": [], "fake": [], "z_img": [], "meta": []})
        taken = sum(len(x) for x in store["real"])
        if taken >= self.val_images:
            return
        keep = min(len(batch["key"]), self.val_images - taken)
        generator = torch.Generator(device=self.device).manual_seed(hash_seed(self.seed, "val-sample", dataloader_idx, batch_idx))
        fake = self.sample(batch["img_emb"][:keep], batch["caption"][:keep], generator)
        store["real"].append(batch["image"][:keep].float())
        store["fake"].append(fake.float())
        store["z_img"].append(F.normalize(batch["img_emb"][:keep].float(), dim=-1))
        store["meta"] += list(batch.get("meta") or [{}] * keep)[:keep]

    def on_validation_epoch_end(self) -> None:
        encode_text = lambda texts: self.clip.encode_text(texts).z_txt  # noqa: E731
        for suffix, store in self.val_store.items():
            real, fake, z_img = (torch.cat(store[k]) for k in ("real", "fake", "z_img"))
            z_fake, z_real = self.clip.encode_image(fake), self.clip.encode_image(real)
            self.log(f"val/decoder/clip_sim{suffix}", (z_fake * z_img).sum(-1).mean(), add_dataloader_idx=False)
            self.log(f"val/decoder/clip_sim_real{suffix}", (z_real * z_img).sum(-1).mean(), add_dataloader_idx=False)
            for attribute, value in zero_shot_attributes(encode_text, z_fake, store["meta"]).items():
                self.log(f"val/decoder/zeroshot_{attribute}{suffix}", value, add_dataloader_idx=False)
            if "attributes" in self.evaluators and all(m.get("objects") for m in store["meta"]):
                from unclip.eval.attributes import attribute_accuracy

                objects = [m["objects"] for m in store["meta"]]
                for name, images in (("", fake), ("_real", real)):  # _real: the classifier's ceiling at this size
                    acc = attribute_accuracy(self.evaluators["attributes"], images, objects)["attr_acc"]
                    self.log(f"val/decoder/attr_acc{name}{suffix}", acc, add_dataloader_idx=False)
            self.save_grid(real, fake, f"val{suffix}")
        self.val_store = {}

    def save_grid(self, real: torch.Tensor, fake: torch.Tensor, name: str) -> None:
        """Real images above their decodings, as a PNG in the run dir (every logger) and to wandb if used."""
        self.save_image_rows([real, fake], name)
