"""FrozenCLIP: an open_clip model and its tokenizer, frozen, giving z_t (+ token states) and z_i.

Loads any open_clip model name with a pretrained tag (``ViT-B-32`` / ``laion2b_s34b_b79k``), a local
checkpoint path, or a model registered by this project (``unclip-tiny``, and CLIPs published by
``model=clip_pretrain`` as ``NAME.pt`` + ``NAME.json``). Without weights (``pretrained=None``) the model is
built from its own seed, ``init_seed``, so that separate commands (embed, train, evaluate) naming the same
random CLIP get the same weights, whatever the global RNG holds. The object is deliberately *not* an
``nn.Module``: a LightningModule that holds it does not register, average (EMA) or checkpoint it; it
is named by its identity (model name + sha256 of the weights) instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

CONFIG_DIR = Path(__file__).parent / "clip_configs"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
open_clip.add_model_config(CONFIG_DIR)


@dataclass
class TextEncoding:
    z_txt: torch.Tensor  # (B, D) normalised pooled text embedding z_t
    tokens: torch.Tensor  # (B, L, W) token states after the final LayerNorm, before pooling
    mask: torch.Tensor  # (B, L) bool, True for real tokens (start .. end-of-text)
    pooled: torch.Tensor | None = None  # (B, D) z_t before normalisation (what published pipelines pass on)


def register_published(path: str | Path) -> str:
    """Registers the model-config JSON published beside a CLIP state dict; returns its model name."""
    config = Path(path).with_suffix(".json")
    if not config.exists():
        raise FileNotFoundError(f"CLIP checkpoint {path} has no model config {config} beside it; pass clip.model_name")
    open_clip.add_model_config(config)
    return config.stem


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 over the sorted state_dict names and tensor bytes: moving or re-saving weights keeps it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FrozenCLIP:
    """A frozen open_clip model: ``encode_text`` -> :class:`TextEncoding`, ``encode_image`` -> z_i."""

    def __init__(self, model_name: str | None = None, pretrained: str | None = None, precision: str = "fp32",
                 device: str | torch.device = "cpu", name: str | None = None, init_seed: int = 0, **_ignored):
        if pretrained and Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors") and not Path(pretrained).exists():
            raise FileNotFoundError(f"CLIP weights {pretrained} not found; train them with `python train.py model=clip_pretrain` "
                                    f"(published to outputs/artifacts/clip/) or set clip.pretrained")
        if pretrained and Path(pretrained).exists() and Path(pretrained).with_suffix(".json").exists():
            published = register_published(pretrained)
            model_name = model_name or published
        if not model_name and pretrained:
            raise ValueError(f"no model config {Path(pretrained).with_suffix('.json')} beside the CLIP weights {pretrained}; "
                             f"pass clip.model_name (the open_clip architecture of those weights, e.g. unclip-tiny)")
        if not model_name:
            raise ValueError("clip.model_name is required (an open_clip model name, e.g. ViT-B-32 or unclip-tiny)")
        if precision not in DTYPES:
            raise ValueError(f"clip.precision must be one of {list(DTYPES)}, got {precision!r}")
        self.model_name, self.pretrained, self.name = model_name, pretrained, name or model_name
        # random init from its own seed, on a forked CPU generator: the caller's RNG state neither decides the
        # weights nor is moved by building them (open_clip builds on the CPU, then loads any weights over them)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(init_seed))
            self.model, _, self.preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
        self.random_init_seed = None if pretrained else int(init_seed)
        self.model.eval().requires_grad_(False).to(device=device, dtype=DTYPES[precision])
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.dtype = DTYPES[precision]
        cfg = self.model.visual.preprocess_cfg
        self.image_size = self.model.visual.image_size
        self.image_size = self.image_size[0] if isinstance(self.image_size, (tuple, list)) else self.image_size
        self.mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
        self._sha256: str | None = None

    # ------------------------------------------------------------------ identity and placement
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(open_clip.get_model_config(self.model_name)["embed_dim"])

    @property
    def text_width(self) -> int:
        return int(self.model.ln_final.normalized_shape[0]) if hasattr(self.model, "ln_final") else int(self.model.text.width)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.context_length)

    @property
    def vocab_size(self) -> int:
        """The number of token ids the tokenizer gives out (open_clip's own BPE, or a Hugging Face tokenizer's)."""
        return int(getattr(self.tokenizer, "vocab_size", None) or len(getattr(self.tokenizer, "tokenizer", self.tokenizer)))

    def identity(self) -> dict:
        if self._sha256 is None:
            self._sha256 = weights_sha256(self.model)
        # random_init_seed: set for random weights only (rebuilt from it, e.g. by unclip.load); the sha256 alone
        # decides whether two CLIPs are the same
        return {"model": self.model_name, "sha256": self._sha256, "dim": self.embed_dim,
                "pretrained": str(self.pretrained) if self.pretrained else None, "random_init_seed": self.random_init_seed}

    def to(self, device) -> "FrozenCLIP":
        self.model.to(device)
        return self

    # -------------------------------------------------------------------------------- text
    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions)).to(self.device)

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> TextEncoding:
        """Pooled, normalised z_t: (B, D) and per-token states (B, L, W) with their mask.

        open_clip's ``encode_text`` returns only the pooled vector, so the text tower's own pieces run
        here in its order (token + positional embedding, causal transformer, final LayerNorm, pooling,
        projection); the test checks the pooled result against ``encode_text``.
        """
        return self.encode_tokens(self.tokenize(captions))

    @torch.no_grad()
    def encode_tokens(self, text: torch.Tensor) -> TextEncoding:
        """:meth:`encode_text` of token ids (B, L) from :meth:`tokenize`."""
        model = self.model
        if hasattr(model, "transformer") and hasattr(model, "token_embedding"):
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(text).to(cast) + model.positional_embedding.to(cast)
            x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
            pooled = open_clip.transformer.text_global_pool(x, text, model.text_pool_type,
                                                            eos_token_id=getattr(model, "text_eos_id", None))
            if model.text_projection is not None:
                pooled = model.text_projection(pooled) if isinstance(model.text_projection, torch.nn.Linear) else pooled @ model.text_projection
        else:  # CustomTextCLIP: the text tower returns its tokens when asked
            tower = model.text
            previous, tower.output_tokens = tower.output_tokens, True
            try:
                pooled, x = tower(text)
            finally:
                tower.output_tokens = previous
        mask = text != 0
        mask[torch.arange(len(text)), text.argmax(-1)] = True  # the end-of-text token is always real
        return TextEncoding(F.normalize(pooled.float(), dim=-1), x.float(), mask, pooled.float())

    # ------------------------------------------------------------------------------- images
    def prepare_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> CLIP input: bicubic resize to the CLIP resolution, then open_clip's mean/std."""
        x = (images.float() + 1) / 2
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True, align_corners=False)
            x = x.clamp(0, 1)
        return ((x - self.mean.to(x.device)) / self.std.to(x.device)).to(self.dtype)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor | Sequence[Image.Image]) -> torch.Tensor:
        """Normalised z_i (B, D), from a tensor in [-1, 1] or from PIL images (open_clip's own preprocess)."""
        if isinstance(images, torch.Tensor):
            pixels = self.prepare_images(images.to(self.device))
        else:
            pixels = torch.stack([self.preprocess(img) for img in images]).to(self.device, self.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)


def save_published(model: torch.nn.Module, model_name: str, path: str | Path) -> Path:
    """Publishes a CLIP as a plain open_clip state dict ``NAME.pt`` plus its model config ``NAME.json``,
    so both open_clip itself and ``clip.pretrained=NAME.pt`` load it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = open_clip.get_model_config(model_name)
    # the config first and each file atomically: the weights' file is what marks a CLIP published
    for target, write in ((path.with_suffix(".json"), lambda f: f.write_text(json.dumps(config, indent=1))),
                          (path, lambda f: torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, f))):
        tmp = target.with_name(target.name + ".tmp")
        write(tmp)
        tmp.replace(target)
    return path
