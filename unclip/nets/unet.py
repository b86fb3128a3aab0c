"""The decoder's UNet (ADM / GLIDE style, as unCLIP §2.1 builds on GLIDE). Plain torch.

Residual blocks take the timestep embedding (plus the projected z_i) as a scale-shift of their second
GroupNorm; attention blocks at chosen resolutions attend over the pixels *and* the context tokens: z_i
projected into ``context_tokens`` (4, unCLIP §2.1) extra tokens, optionally followed by the caption's
token states. ``lowres_channels`` > 0 makes it an upsampler: a low-resolution image, upsampled to the
output size, is concatenated to the input channels; ``aug_level_embed`` adds the embedding of that image's
noise-augmentation level to the timestep embedding (Imagen §2.5 conditioning augmentation), and
``middle_attention=false`` leaves a net of convolutions only (unCLIP's upsamplers have no attention, so
they train on crops and sample at full size).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from unclip.nets.layers import attention, net_config, timestep_embedding


@dataclass
class UNetConfig:
    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    channels: int = 64                        # width at full resolution
    channel_mult: list = field(default_factory=lambda: [1, 2, 3, 4])
    num_res_blocks: int = 2
    attention_resolutions: list = field(default_factory=lambda: [32, 16, 8])  # in pixels
    head_channels: int = 32
    dropout: float = 0.0
    embed_dim: int = 512                      # z_i dimension; 0 = unconditional (e.g. an upsampler without z_i)
    context_tokens: int = 4                   # unCLIP: z_i becomes 4 extra context tokens (0: z_i only added to t's
                                              # embedding, for nets without attention)
    text_width: int = 0                       # caption token states (0 = no text tokens)
    caption_vocab: int = 0                    # > 0: a learned embedding of each caption token id, added to its state
    learn_sigma: bool = False                 # twice the output channels (IDDPM learned range)
    lowres_channels: int = 0                  # upsamplers: channels of the conditioning low-res image
    patch_size: int = 1                       # p > 1: the net runs on p x p pixel patches (image_size / p grid)
    aug_level_embed: bool = False             # upsamplers: embed the low-res noise-augmentation level, added to t's
    middle_attention: bool = True             # attention in the middle block (false: convolutions only)
    groups: int = 32
    channels_last: bool = False               # NHWC activations and weights: oneDNN's fast convolutions in bf16


class GroupNorm(nn.GroupNorm):
    """GroupNorm that normalises bf16 channels_last input in NCHW: torch's channels_last GroupNorm is ~9x
    slower than its NCHW one in bf16 on a CPU (forward + backward), more than two layout copies cost; in
    fp32 the two are alike and the input stays as it is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
            return super().forward(x)
        return super().forward(x.contiguous()).contiguous(memory_format=torch.channels_last)


def norm(channels: int, groups: int) -> GroupNorm:
    return GroupNorm(math.gcd(groups, channels), channels)  # the most groups <= ``groups`` that divide evenly


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialised output layers: every residual branch starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * cout))
        self.out_norm = norm(cout, groups)
        self.out_layers = nn.Sequential(nn.SiLU(), nn.Dropout(dropout), zero(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)  # ADM scale-shift norm
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over pixels whose keys/values also include the context tokens (GLIDE)."""

    def __init__(self, channels: int, head_channels: int, context_dim: int, groups: int):
        super().__init__()
        self.heads = max(1, channels // head_channels)
        self.norm = norm(channels, groups)
        # q, k, v and the output projection act on each pixel alone: linear layers over (B, HW, C) pixel tokens
        # (ADM's 1x1 convolutions, whose bf16 forward and backward oneDNN runs at a fifth of a matmul's rate)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.context_kv = nn.Linear(context_dim, 2 * channels) if context_dim else None
        self.proj = zero(nn.Linear(channels, channels))
        self._register_load_state_dict_pre_hook(self.squeeze_conv_weights)

    @staticmethod
    def squeeze_conv_weights(state_dict, prefix, *args):
        """Checkpoints written when q, k, v and the projection were 1x1 Conv1d layers: their (out, in, 1) weights
        (and LoRA factors) are these linear layers' (out, in)."""
        for key in [k for k in state_dict if k.startswith((prefix + "qkv.", prefix + "proj."))]:
            if state_dict[key].dim() == 3 and state_dict[key].shape[-1] == 1:
                state_dict[key] = state_dict[key].squeeze(-1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None, context_valid: torch.Tensor | None) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        heads, d = self.heads, c // self.heads
        # in this layout q, k and v come out with the head dimension contiguous, as the fused (flash) CPU kernel
        # needs; for channels_last input the tokens are a free view, and so is the output
        tokens = self.norm(x).permute(0, 2, 3, 1).reshape(b, hgt * wid, c)
        q, k, v = self.qkv(tokens).view(b, hgt * wid, 3, heads, d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, heads, HW, d)
        mask = None
        if context is not None and self.context_kv is not None:
            ck, cv = self.context_kv(context).view(b, -1, 2, heads, d).permute(2, 0, 3, 1, 4)
            k, v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
            # an all-visible mask is no mask: the fused kernel then runs unmasked (eager only: under torch.compile
            # the data-dependent check would break the graph, inside the UNet's loop, and so compile nothing)
            if torch.compiler.is_compiling() or not bool(context_valid.all()):
                visible = torch.ones(b, hgt * wid, dtype=torch.bool, device=x.device)
                mask = torch.cat([context_valid, visible], dim=1)[:, None, None, :]  # (B, 1, 1, Lc + HW)
        y = attention(q, k, v, mask).transpose(1, 2).reshape(b, hgt * wid, c)  # (B, HW, C)
        out = self.proj(y).view(b, hgt, wid, c).permute(0, 3, 1, 2)
        return x + (out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous())


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Module):
    """One UNet level's block: a ResBlock, then attention when this resolution has it."""

    def __init__(self, cin, cout, emb_dim, dropout, groups, attend: bool, head_channels, context_dim):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, dropout, groups)
        self.attn = AttentionBlock(cout, head_channels, context_dim, groups) if attend else None

    def forward(self, x, emb, context, context_valid):
        x = self.res(x, emb)
        return self.attn(x, context, context_valid) if self.attn is not None else x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig | dict):
        super().__init__()
        self.config = c = net_config(UNetConfig, config)
        ch, emb_dim = c.channels, 4 * c.channels
        if c.embed_dim and c.text_width and not c.context_tokens:
            raise ValueError("caption tokens join z_i's context tokens: context_tokens must be > 0 with text_width")
        context_dim = ch * max(c.channel_mult) if ((c.embed_dim and c.context_tokens) or c.text_width) else 0
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # the augmentation level is a training step of the same diffusion: embedded like t, by its own MLP
        self.aug_mlp = (nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
                        if c.aug_level_embed else None)
        if c.embed_dim:
            self.image_embed_to_time = nn.Linear(c.embed_dim, emb_dim)                      # unCLIP §2.1: added to t
            self.image_embed_to_tokens = (nn.Linear(c.embed_dim, c.context_tokens * context_dim)  # 4 extra tokens
                                          if c.context_tokens else None)
            self.null_image_embed = nn.Parameter(torch.zeros(c.embed_dim))                 # CFG: z_i dropped
        self.text_proj = nn.Linear(c.text_width, context_dim) if c.text_width else None
        # A frozen CLIP's text tower can merge words its image tower does not tell apart (on shapes, "circle" and
        # "hexagon"); GLIDE, whose decoder unCLIP keeps, trains its own text encoder with the decoder. Each token id
        # gets a learned vector added to its CLIP state, zero at first: the net starts as the CLIP-only one.
        self.caption_embedding = (zero(nn.Embedding(c.caption_vocab, c.text_width))
                                  if c.text_width and c.caption_vocab else None)
        self.context_norm = nn.LayerNorm(context_dim) if context_dim else None

        if c.image_size % c.patch_size:
            raise ValueError(f"image_size {c.image_size} is not a multiple of patch_size {c.patch_size}")
        # Patches (simple diffusion, Hoogeboom et al. 2023 §3: avoid full-resolution feature maps): p x p
        # pixels become p^2 x channels of one grid cell, losslessly (pixel unshuffle); the costliest level
        # of the net then runs on p^2 fewer positions. attention_resolutions count grid cells.
        area = c.patch_size ** 2
        self.input = nn.Conv2d((c.in_channels + c.lowres_channels) * area, ch, 3, padding=1)
        self.down, skips, resolution, cur = nn.ModuleList(), [ch], c.image_size // c.patch_size, ch
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                self.down.append(Stage(cur, ch * mult, emb_dim, c.dropout, c.groups, resolution in c.attention_resolutions,
                                       c.head_channels, context_dim))
                cur = ch * mult
                skips.append(cur)
            if level < len(c.channel_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                resolution //= 2
        self.middle = nn.ModuleList([Stage(cur, cur, emb_dim, c.dropout, c.groups, c.middle_attention, c.head_channels,
                                           context_dim),
                                     Stage(cur, cur, emb_dim, c.dropout, c.groups, False, c.head_channels, context_dim)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                self.up.append(Stage(cur + skips.pop(), ch * mult, emb_dim, c.dropout, c.groups,
                                     resolution in c.attention_resolutions, c.head_channels, context_dim))
                cur = ch * mult
                if level > 0 and i == c.num_res_blocks:
                    self.up.append(Upsample(cur))
                    resolution *= 2
        out_channels = c.out_channels * (2 if c.learn_sigma else 1)
        self.out = nn.Sequential(norm(cur, c.groups), nn.SiLU(), zero(nn.Conv2d(cur, out_channels * area, 3, padding=1)))
        if c.channels_last:
            self.to(memory_format=torch.channels_last)

    def hparams(self) -> dict:
        return asdict(self.config)

    def use_channels_last(self) -> "UNet":
        """NHWC activations and weights from here on, whatever the net was trained in (the same function):
        an upsampler samples 1.3-1.4x faster in it on a CPU, fp32 and bf16 alike (README, bench)."""
        self.config.channels_last = True
        return self.to(memory_format=torch.channels_last)

    def caption_states(self, tokens: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """The caption's token states (B, L, W) as the net reads them: with ``caption_vocab``, each plus the learned
        embedding of its token id (``token_ids`` (B, >= L), the tokenizer's ids of the same captions)."""
        if self.caption_embedding is None:
            return tokens
        return tokens + self.caption_embedding(token_ids[:, :tokens.shape[1]].to(tokens.device)).to(tokens.dtype)

    def conditioning(self, t, z_img, tokens, mask, drop_image, drop_text, aug_level=None):
        """(embedding added in every ResBlock, context tokens, which context tokens are visible)."""
        emb = self.time_mlp(timestep_embedding(t, self.config.channels))
        if self.aug_mlp is not None:
            if aug_level is None:
                raise ValueError("this UNet embeds the low-res noise-augmentation level (aug_level_embed=true): pass "
                                 "aug_level (B,), the training step the low-res image was noised to")
            emb = emb + self.aug_mlp(timestep_embedding(aug_level, self.config.channels))
        if not self.config.embed_dim:
            return emb, None, None
        b = len(t)
        if drop_image is not None:
            z_img = torch.where(drop_image[:, None], self.null_image_embed.to(z_img.dtype), z_img)
        emb = emb + self.image_embed_to_time(z_img)
        if self.image_embed_to_tokens is None:
            return emb, None, None
        context = self.image_embed_to_tokens(z_img).view(b, self.config.context_tokens, -1)
        valid = torch.ones(b, self.config.context_tokens, dtype=torch.bool, device=t.device)
        if self.text_proj is not None and tokens is not None:
            text_valid = mask.bool() if drop_text is None else mask.bool() & ~drop_text[:, None]
            context = torch.cat([context, self.text_proj(tokens)], dim=1)
            valid = torch.cat([valid, text_valid], dim=1)
        return emb, self.context_norm(context), valid

    def forward(self, x: torch.Tensor, t: torch.Tensor, z_img: torch.Tensor | None = None, tokens: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, drop_image: torch.Tensor | None = None, drop_text: torch.Tensor | None = None,
                lowres: torch.Tensor | None = None, aug_level: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, C, H, W) noisy image; t: (B,) training steps; z_img: (B, D) scaled CLIP image embedding;
        tokens: (B, L, W) caption token states with mask (B, L); drop_*: (B,) bool, condition dropped (CFG);
        lowres: (B, C, H, W) the low-resolution image already upsampled to x's size (upsamplers);
        aug_level: (B,) the training step ``lowres`` was noised to (nets with ``aug_level_embed``)."""
        if self.config.lowres_channels and (lowres is None or lowres.shape[1:] != (self.config.lowres_channels, *x.shape[2:])):
            got = None if lowres is None else tuple(lowres.shape)
            raise ValueError(f"this UNet is an upsampler: lowres must be ({x.shape[0]}, {self.config.lowres_channels}, "
                             f"{x.shape[2]}, {x.shape[3]}) (the low-res image upsampled to x's size), got {got}")
        emb, context, valid = self.conditioning(t, z_img, tokens, mask, drop_image, drop_text, aug_level)
        h = torch.cat([x, lowres], dim=1) if self.config.lowres_channels else x
        h = F.pixel_unshuffle(h, self.config.patch_size) if self.config.patch_size > 1 else h
        h = self.input(h.contiguous(memory_format=torch.channels_last) if self.config.channels_last else h)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, context, valid) if isinstance(layer, Stage) else layer(h)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb, context, valid)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb, context, valid) if isinstance(layer, Stage) else layer(h)
        out = self.out(h)
        return F.pixel_shuffle(out, self.config.patch_size) if self.config.patch_size > 1 else out
