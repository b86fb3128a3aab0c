"""A published unCLIP decoder (karlo) as an unclip stage: ``python -m unclip.convert kind=karlo`` writes it,
``unclip.load`` opens it, ``UnCLIPPipeline``, ``sample.py decoder=PATH`` and evaluation run it as a decoder.

Everything but the net and the condition is :class:`DecoderModule`'s own: the diffusion process (the published
scheduler's betas, eps prediction, learned-range variance), the samplers, classifier-free guidance (the
unconditional half drops z_i and the caption together, the learned variance taken from the conditional half, as
diffusers' ``UnCLIPPipeline``), DDIM inversion and validation. The net is diffusers' ``UNet2DConditionModel``
with karlo's ``UnCLIPTextProjModel`` (:mod:`unclip.nets.diffusers_decoder`). The condition follows what karlo
was trained on rather than unclip's:

- the caption: CLIP's raw z_t (its norm varies by prompt) and its token states over the whole context, with the
  empty prompt's (``null_prompt``) standing for a dropped or absent caption;
- z_i: unclip's embeddings are unit-norm, karlo's raw, so a unit-norm z_i is scaled to ``image_norm``, the
  root-mean-square norm of the published prior's image-embedding statistics (sqrt(sum(mean^2 + std^2))),
  set when converting. One fixed length for every image: the direction is what the prior and CLIP give.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unclip.modules.decoder import DecoderModule
from unclip.nets.diffusers_decoder import DiffusersDecoder


class PublishedDecoderModule(DecoderModule):
    kind = "published_decoder"

    def __init__(self, net: dict, diffusion: dict, sampler: dict, clip=None, image_norm: float = 1.0,
                 null_prompt: str = "", source: str = "", image_drop_prob: float = 0.1, text_drop_prob: float = 0.5,
                 val_images: int = 16, attribute_classifier: str | None = None, optim: dict | None = None, seed: int = 0):
        if not image_norm > 0:
            raise ValueError(f"image_norm must be positive (the length karlo's image embeddings have), got {image_norm}")
        super().__init__(net, diffusion, sampler, clip=clip, text_cond=True, image_drop_prob=image_drop_prob,
                         text_drop_prob=text_drop_prob, val_images=val_images, attribute_classifier=attribute_classifier,
                         optim=optim, seed=seed)
        self.image_norm, self.null_prompt = float(image_norm), null_prompt
        self.hparams.update({"image_norm": self.image_norm, "null_prompt": null_prompt, "source": source})

    def build_net(self, net: dict, diffusion: dict) -> DiffusersDecoder:
        decoder = DiffusersDecoder(net)
        clip, dim = self.clip, decoder.embed_dim
        if clip.embed_dim != dim or clip.text_width != dim:
            raise ValueError(f"the published decoder's text_proj reads embeddings and token states of width {dim}, but "
                             f"the CLIP gives embed_dim {clip.embed_dim} and token width {clip.text_width}; use the CLIP it "
                             f"was made for")
        if decoder.config.learn_sigma != (diffusion.get("variance") == "learned_range"):
            raise ValueError(f"the decoder UNet outputs {decoder.unet.config.out_channels} channels but diffusion.variance "
                             f"is {diffusion.get('variance')!r}: 6 channels go with learned_range, 3 with a fixed variance")
        return decoder

    # ------------------------------------------------------------------------------- conditioning
    def image_condition(self, z_img: torch.Tensor) -> torch.Tensor:
        """z_i (B, D) as karlo reads it: unit-norm direction times ``image_norm``."""
        return F.normalize(z_img.float(), dim=-1) * self.image_norm

    def text_condition(self, captions, cached: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption as the net reads it: (raw z_t, token states) packed (B, 1 + L, D), mask (B, 1 + L); the
        whole context (the published UNet's attention mask handling wants a fixed length). Always the text
        tower's: the cache's token states come without the un-normalised z_t this net reads (``cached`` unused)."""
        text = self.clip.encode_text(list(captions))
        return self.net.pack(text.pooled.to(self.device), text.tokens.float().to(self.device), text.mask.to(self.device))

    def set_null(self) -> None:
        """The empty prompt's caption (``null_prompt``, "" as in diffusers' pipelines), computed once."""
        if self.net.null is None:
            self.net.null = self.text_condition([self.null_prompt])

    # ------------------------------------------------------------------ every path sets it first
    def loss(self, batch: dict) -> torch.Tensor:
        self.set_null()
        return super().loss(batch)

    def model_fn(self, z_img: torch.Tensor, captions=None, guidance_scale: float | None = None):
        self.set_null()
        return super().model_fn(z_img, captions, guidance_scale)

    def composed_model_fn(self, z_parts: torch.Tensor, weights: torch.Tensor, captions=None,
                          guidance_scale: float | None = None):
        self.set_null()
        return super().composed_model_fn(z_parts, weights, captions, guidance_scale)
