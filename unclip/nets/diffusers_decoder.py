"""A published unCLIP decoder's net (karlo): diffusers' ``UNet2DConditionModel`` with its
``UnCLIPTextProjModel``, behind the interface :class:`unclip.modules.decoder.DecoderModule` asks of its net,
``net(x_t, t, z_img, text, mask, drop_image, drop_text)``.

unCLIP §2.1, as karlo builds it and diffusers' ``UnCLIPPipeline`` calls it: ``text_proj`` maps (z_i, z_t, the
caption's token states) to the UNet's context (4 extra tokens from z_i before the projected, LayerNormed token
states) and to an embedding added to the timestep's (``class_labels``, from z_i and z_t). ``text_proj`` reads z_t
and the token states at one width (its ``clip_embeddings_dim``), so the caption travels as one tensor
``text`` (B, 1 + L, D): row 0 is z_t (raw, not unit-norm: CLIP's projection as the pipeline passes it), rows 1..L
the token states, with ``mask`` (B, 1 + L) True for z_t and the real tokens.

Classifier-free guidance drops z_i for text_proj's learned ``learned_classifier_free_guidance_embeddings`` and the
caption for the empty prompt's encoding (``null``, set by the module from its CLIP), as the pipeline's
unconditional branch does. The UNet predicts eps and, with 6 output channels, the learned-range variance
interpolation (IDDPM eq. 15).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip.nets.layers import net_config


@dataclass
class DiffusersDecoderConfig:
    unet: dict = field(default_factory=dict)       # diffusers UNet2DConditionModel config (its config.json, plain)
    text_proj: dict = field(default_factory=dict)  # diffusers UnCLIPTextProjModel config

    # what DecoderModule reads of a net's config
    @property
    def image_size(self) -> int:
        return int(self.unet.get("sample_size", 64))

    @property
    def out_channels(self) -> int:  # image channels (the sample's), not the UNet's (twice as many with a variance)
        return int(self.unet.get("in_channels", 3))

    @property
    def learn_sigma(self) -> bool:
        return int(self.unet.get("out_channels", 3)) == 2 * self.out_channels


class DiffusersDecoder(nn.Module):
    def __init__(self, config: DiffusersDecoderConfig | dict):
        super().__init__()
        from diffusers import UNet2DConditionModel  # an optional dependency: only published stages need it
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

        self.config = c = net_config(DiffusersDecoderConfig, config)
        self.unet = UNet2DConditionModel(**c.unet)
        self.text_proj = UnCLIPTextProjModel(**c.text_proj)
        if self.unet.config.cross_attention_dim != self.text_proj.config.cross_attention_dim:
            raise ValueError(f"the decoder UNet attends to context of width {self.unet.config.cross_attention_dim} but "
                             f"text_proj makes {self.text_proj.config.cross_attention_dim}; the two configs must belong together")
        if int(self.unet.config.out_channels) not in (c.out_channels, 2 * c.out_channels):
            raise ValueError(f"the decoder UNet maps {c.out_channels} channels to {self.unet.config.out_channels}; "
                             f"expected {c.out_channels} (eps) or {2 * c.out_channels} (eps and a learned variance)")
        self.null: tuple[torch.Tensor, torch.Tensor] | None = None  # the empty prompt's (text, mask), 1 row; not a buffer

    def hparams(self) -> dict:
        return asdict(self.config)

    @property
    def embed_dim(self) -> int:
        return int(self.text_proj.config.clip_embeddings_dim)

    @property
    def extra_tokens(self) -> int:
        return int(self.text_proj.config.clip_extra_context_tokens)

    # ------------------------------------------------------------------------------------- inputs
    @staticmethod
    def pack(z_txt: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z_t (B, D), token states (B, L, D) and their mask (B, L) -> ``text`` (B, 1 + L, D), ``mask`` (B, 1 + L)."""
        text = torch.cat([z_txt[:, None].to(tokens.dtype), tokens], dim=1)
        return text, F.pad(mask.bool(), (1, 0), value=True)

    def caption(self, b: int, text: torch.Tensor | None, mask: torch.Tensor | None, drop: torch.Tensor | None,
                like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The caption of each of ``b`` rows; no caption at all (``vary``, ``interpolate``) and dropped rows (B,) bool
        get the empty prompt's, as karlo's image-variation pipeline and the unconditional branch use."""
        if text is not None and (drop is None or not bool(drop.any())):
            return text, mask
        if self.null is None:
            raise ValueError("the empty prompt's condition is not set (PublishedDecoderModule.set_null sets it from the CLIP)")
        null_text, null_mask = (v.to(like.device) for v in self.null)
        null_text = null_text.to(like.dtype).expand(b, -1, -1)
        null_mask = null_mask.expand(b, -1)
        if text is None:
            return null_text, null_mask
        if text.shape[1] != null_text.shape[1]:
            raise ValueError(f"the caption has {text.shape[1] - 1} token states, the empty prompt {null_text.shape[1] - 1}; "
                             f"a published decoder reads the CLIP's whole context, untrimmed")
        pick = drop.view(-1, 1)
        return torch.where(pick[..., None], null_text, text), torch.where(pick, null_mask, mask)

    # -------------------------------------------------------------------------------------- passes
    def forward(self, x: torch.Tensor, t: torch.Tensor, z_img: torch.Tensor, text: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, drop_image: torch.Tensor | None = None,
                drop_text: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, 3, H, W) noisy image; t: (B,) training steps; z_img: (B, D) image embedding at the scale karlo was
        trained on; text, mask: the caption (see :meth:`pack`) or None; drop_*: (B,) bool, condition dropped (CFG).
        Returns (B, 3 or 6, H, W): eps, then the variance interpolation in [-1, 1] when learned."""
        b = len(x)
        if drop_image is not None:
            null_image = self.text_proj.learned_classifier_free_guidance_embeddings.to(z_img.dtype)
            z_img = torch.where(drop_image[:, None], null_image, z_img)
        text, mask = self.caption(b, text, mask, drop_text, z_img)
        context, added = self.text_proj(image_embeddings=z_img, prompt_embeds=text[:, 0], text_encoder_hidden_states=text[:, 1:],
                                        do_classifier_free_guidance=False)
        context_mask = F.pad(mask[:, 1:].bool(), (self.extra_tokens, 0), value=True)  # the z_i tokens are always seen
        return self.unet(x, t, encoder_hidden_states=context, class_labels=added, attention_mask=context_mask,
                         return_dict=False)[0]
