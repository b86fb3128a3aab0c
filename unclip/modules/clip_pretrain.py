"""Contrastive pretraining of a small open_clip model on the project's own caption-image pairs.

Loss: open_clip's ``ClipLoss`` (symmetric InfoNCE, Radford et al. 2021) with the model's learnable
logit scale. ``hard_negatives=true`` (shapes data: needs each sample's KEY.json objects) adds, for every
image, its caption with one attribute wrong as an extra text the image must rank below its own
(NegCLIP, Yuksekgonul et al. 2023): a batch of random captions rarely differs from the true one in a
single word, so without them CLIP learns what a caption is about, not which shape or which colour where.
``image_negatives=P`` (shapes data) gives a share P of the images an image hard negative too: the same picture
with one object redrawn as another shape, which its caption must rank below the real one (TripletCLIP, Patel et
al. 2024), so the image tower is told exactly which outline the caption names.
Validation reports caption->image retrieval top-1/top-5 over up to ``retrieval_pool`` val
pairs and zero-shot shape / colour accuracy from prompts built from the shapes vocabulary.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from contextlib import nullcontext

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import gather_features
from torch.nn.attention import SDPBackend, sdpa_kernel

from unclip.clip import save_published
from unclip.data.shapes import DEFAULT_HOLDOUT, VOCAB, counterfactual_image, counterfactual_shape, hard_negative_caption
from unclip.modules.base import UnclipModule
from unclip.nets.layers import attention


def retrieval_topk(z_txt: torch.Tensor, z_img: torch.Tensor, ks=(1, 5)) -> dict[int, float]:
    """Caption i should retrieve image i among all images: fraction whose true image ranks in the top k."""
    sims = z_txt @ z_img.T  # (N, N)
    rank = (sims > sims.diagonal()[:, None]).sum(1)  # images scored above the true one
    return {k: (rank < k).float().mean().item() for k in ks}


def attribute_prompts(attribute: str) -> dict[str, list[str]]:
    """Prompt ensembles (Radford et al. 2021, §3.1.4): a shape class averages "a {colour} {shape}" over
    every colour, a colour class over every shape, so no single wording decides."""
    if attribute == "shape":
        return {s: [f"a {c} {s}" for c in VOCAB.colors] for s in VOCAB.shapes}
    return {c: [f"a {c} {s}" for s in VOCAB.shapes] for c in VOCAB.colors}


def zero_shot_attributes(clip_encode_text, z_img: torch.Tensor, metas: list[dict]) -> dict[str, float]:
    """Shape and colour accuracy on single-object images, by the nearest (ensembled) class embedding."""
    single = [i for i, m in enumerate(metas) if len(m.get("objects", [])) == 1]
    if not single:
        return {}
    out = {}
    for attribute in ("shape", "color"):
        prompts = attribute_prompts(attribute)
        classes = torch.stack([F.normalize(F.normalize(clip_encode_text(texts), dim=-1).mean(0), dim=-1)
                               for texts in prompts.values()])
        predicted = (z_img[single] @ classes.T).argmax(-1)
        names = list(prompts)
        truth = torch.tensor([names.index(metas[i]["objects"][0][attribute]) for i in single])
        out[attribute] = (predicted.cpu() == truth).float().mean().item()
    return out


def trimmable_text_tower(model) -> bool:
    """Whether ``model``'s text tower may run on captions cut short (:func:`encode_text_by_length`): open_clip's
    built-in causal tower pooled at the end-of-text token, whose states before that token never see what follows."""
    mask = getattr(model, "attn_mask", None)
    return (all(hasattr(model, name) for name in ("transformer", "token_embedding", "positional_embedding", "ln_final"))
            and getattr(model, "text_pool_type", None) == "argmax" and mask is not None
            and torch.equal(torch.isneginf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)))


def plain_attention_blocks(transformer) -> bool:
    """Whether :func:`causal_transformer` may run ``transformer``'s blocks: open_clip's own residual attention
    blocks, batch first, self-attention only, without gradient checkpointing."""
    from open_clip.transformer import ResidualAttentionBlock

    return (getattr(transformer, "batch_first", False) and not getattr(transformer, "grad_checkpointing", False)
            and all(type(block) is ResidualAttentionBlock and not hasattr(block, "ln_1_kv")
                    and isinstance(block.attn, torch.nn.MultiheadAttention) and block.attn._qkv_same_embed_dim
                    and block.attn.batch_first and block.attn.dropout == 0.0 for block in transformer.resblocks))


def causal_transformer(transformer, x: torch.Tensor) -> torch.Tensor:
    """open_clip's causal text transformer (``transformer(x, attn_mask=causal)``) over x (B, L, D), with the
    attention of :func:`unclip.nets.layers.attention`: two plain matmuls in training on a CPU, where torch's
    MultiheadAttention takes the fused kernel (or its math fallback), ~4x slower at a text tower's 32 x 32 scores."""
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).tril()
    for block in transformer.resblocks:
        attn, h = block.attn, block.ln_1(x)
        b, n, c = h.shape
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, attn.num_heads, c // attn.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, d)
        y = attention(q, k, v, causal).transpose(1, 2).reshape(b, n, c)
        x = x + block.ls_1(attn.out_proj(y))
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x


def encode_text_by_length(model, tokens: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """open_clip's ``encode_text`` (normalised z_t) of token ids (B, L), computed on captions sorted by length in
    ``groups`` groups, each cut after its longest caption. Exact for a causal tower pooled at the end-of-text
    token (:func:`trimmable_text_tower`): the cut positions are padding that no kept position attends to. The
    shapes captions fill 13 of the 32 positions on average, so the tower does less than half the work."""
    lengths = tokens.argmax(-1) + 1  # the end-of-text token has the largest id
    order = lengths.argsort()
    cast = model.transformer.get_cast_dtype()
    plain = plain_attention_blocks(model.transformer)
    # one lookup for every group: the table's gradient (vocabulary x width, dense) is then built once a step
    embedded = model.token_embedding(tokens[:, :int(lengths.max())]).to(cast)
    pooled = []
    for part in order.chunk(groups):
        n = int(lengths[part].max())
        text = tokens[part, :n]
        x = embedded[part, :n] + model.positional_embedding[:n].to(cast)
        x = causal_transformer(model.transformer, x) if plain else model.transformer(x, attn_mask=model.attn_mask[:n, :n])
        x = model.ln_final(x)
        x = x[torch.arange(len(part), device=x.device), text.argmax(-1)]
        projection = model.text_projection
        if projection is not None:
            x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        pooled.append(x)
    out = torch.empty(len(tokens), pooled[0].shape[-1], dtype=pooled[0].dtype, device=tokens.device)
    out[order] = torch.cat(pooled)
    return F.normalize(out, dim=-1)


def contrastive_loss_with_negatives(z_img: torch.Tensor, z_txt: torch.Tensor, all_img: torch.Tensor,
                                    all_txt: torch.Tensor, all_neg: torch.Tensor, logit_scale: torch.Tensor,
                                    offset: int = 0, all_neg_img: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE in which image i must also rank every extra caption ``all_neg`` (hard negatives,
    nobody's positive) below its own, and caption i every extra image ``all_neg_img`` (image hard negatives):
    image -> text over [captions, negatives], text -> image over [images, image negatives].
    ``z_img``, ``z_txt``: this rank's rows, at ``offset`` in the gathered ``all_*`` (all of them on one device)."""
    labels = torch.arange(len(z_img), device=z_img.device) + offset
    image_to_text = logit_scale * z_img @ torch.cat([all_txt, all_neg]).T
    text_to_image = logit_scale * z_txt @ (all_img if all_neg_img is None else torch.cat([all_img, all_neg_img])).T
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


class DrawnImages:
    """:func:`counterfactual_image` as uint8 arrays, memoised up to ``budget_bytes`` (the least recently used
    dropped first). A run draws the same look-alike of an image many times (the demo's 600 steps: 77k draws,
    27k of them distinct), and each draw, at 4x supersampling and then downsampled, costs ~1 ms of the training
    process's own thread."""

    def __init__(self, budget_bytes: int = 512 << 20):
        self.budget, self.used, self.arrays = budget_bytes, 0, OrderedDict()

    @staticmethod
    def key(meta: dict, index: int, shape: str) -> tuple:
        objects = tuple((o["shape"], tuple(o.get("rgb") or ()), tuple(o.get("geometry") or ())) for o in meta["objects"])
        return objects, tuple(meta["background"]), tuple(sorted(meta.get("render", {}).items())), index, shape

    def __call__(self, meta: dict, index: int, shape: str) -> np.ndarray:
        key = self.key(meta, index, shape)
        if key in self.arrays:
            self.arrays.move_to_end(key)
            return self.arrays[key]
        array = np.asarray(counterfactual_image(meta, index, shape))
        self.arrays[key] = array
        self.used += array.nbytes
        while self.used > self.budget and len(self.arrays) > 1:
            self.used -= self.arrays.popitem(last=False)[1].nbytes
        return array


class ClipPretrainModule(UnclipModule):
    """Trains an open_clip model (from its config name, randomly initialised) with ``ClipLoss``."""

    kind = "clip"
    loadable = False  # publishes a plain open_clip state dict, which FrozenCLIP opens

    def __init__(self, model_name: str = "unclip-tiny", optim: dict | None = None, seed: int = 0,
                 retrieval_pool: int = 1000, clip_name: str | None = None, hard_negatives: bool = False,
                 holdout: list | None = None, lookalike_negatives: float = 0.0, image_negatives: float = 0.0):
        super().__init__(optim=optim, seed=seed)
        self.save_hyperparameters({"kind": self.kind, "model_name": model_name, "retrieval_pool": retrieval_pool,
                                   "hard_negatives": hard_negatives, "lookalike_negatives": lookalike_negatives,
                                   "image_negatives": image_negatives})
        if not 0 <= image_negatives <= 1:
            raise ValueError(f"model.module.image_negatives is the share of a batch's images that get an image hard "
                             f"negative, in [0, 1]; got {image_negatives}")
        self.model_name, self.retrieval_pool = model_name, retrieval_pool
        self.hard_negatives, self.lookalike_negatives = hard_negatives, lookalike_negatives
        self.holdout = [tuple(p) for p in (DEFAULT_HOLDOUT if holdout is None else holdout)]  # never a negative's pair
        self.negative_rng = random.Random(seed)
        self.image_negatives = image_negatives
        self.image_negative_rng = random.Random(seed + 1)  # its own stream: the caption negatives stay as they were
        self.drawn = DrawnImages()
        self.model = open_clip.create_model(model_name)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        size = self.model.visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.register_buffer("pixel_mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        # channels_last: oneDNN's convolutions and batch norms run a ResNet image tower's bf16 step ~1.3x faster
        # on a CPU (weights keep their values; the published state dict and the CLIP identity are unchanged)
        self.model.visual.to(memory_format=torch.channels_last)
        self.trim_text = trimmable_text_tower(self.model)
        self.loss_fn = open_clip.ClipLoss()
        self._val: dict[int, dict[str, list]] = {}

    def setup(self, stage: str) -> None:
        if self.trainer is not None and self.trainer.world_size > 1:
            self.loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=self.global_rank,
                                              world_size=self.trainer.world_size)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = (images + 1) / 2
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", antialias=True).clamp(0, 1)
        return (x - self.pixel_mean) / self.pixel_std

    def attention_kernels(self):
        """On a CPU, attention as plain matmuls: at the text tower's 32 x 32 scores the fused kernel's backward is
        the slowest op of the step (bf16: text tower forward + backward 1.26 -> 0.88 s for 512 captions). For the
        towers :func:`causal_transformer` does not run (not open_clip's own blocks, or not trimmable) and the
        image tower's attention pooling; open_clip's own causal blocks take the project's attention (0.26 -> 0.20 s)."""
        return sdpa_kernel([SDPBackend.MATH]) if self.device.type == "cpu" and self.training else nullcontext()

    def encode(self, images: torch.Tensor, captions: list[str]):
        """(z_img, z_txt, logit scale): open_clip's forward, with the text tower on captions cut by length
        (:func:`encode_text_by_length`) where that is exact."""
        tokens = self.tokenizer(captions).to(self.device)
        pixels = self.pixels(images).contiguous(memory_format=torch.channels_last)
        with self.attention_kernels():
            if not self.trim_text:
                out = self.model(pixels, tokens)
                return out if isinstance(out, tuple) else (out["image_features"], out["text_features"], out["logit_scale"])
            z_img = self.model.encode_image(pixels, normalize=True)
            return z_img, encode_text_by_length(self.model, tokens), self.model.logit_scale.exp()

    def negative_captions(self, metas: list[dict]) -> list[str]:
        captions = [hard_negative_caption(meta, self.negative_rng, self.holdout, self.lookalike_negatives) for meta in metas]
        if any(c is None for c in captions):
            raise ValueError("model.module.hard_negatives=true needs every sample's attributes (KEY.json \"objects\" "
                             "and \"template\", as python -m unclip.data.shapes writes them); this batch has samples "
                             "without them: train with hard_negatives=false on other data")
        return captions

    def counterfactual_images(self, images: torch.Tensor, metas: list[dict]) -> torch.Tensor:
        """Image hard negatives (B', 3, H, W) in [-1, 1] for a share ``image_negatives`` of the batch: each its
        image with one object's shape changed (:func:`counterfactual_shape`), drawn from the stored geometry."""
        picks = self.image_negative_rng.sample(range(len(metas)), round(self.image_negatives * len(metas)))
        if any(not metas[i].get("objects") for i in picks):
            raise ValueError("model.module.image_negatives needs every sample's attributes (KEY.json \"objects\", as "
                             "python -m unclip.data.shapes writes them): train with image_negatives=0 on other data")
        drawn = [self.drawn(metas[i], *counterfactual_shape(metas[i], self.image_negative_rng, self.holdout)) for i in picks]
        if not drawn:
            return images[:0]
        return torch.from_numpy(np.stack(drawn)).to(images.device).permute(0, 3, 1, 2).float().div(127.5).sub(1)

    def hard_negative_loss(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        captions = list(batch["caption"])
        negatives = self.negative_captions(batch["meta"]) if self.hard_negatives else []
        images = batch["image"]
        if self.image_negatives:
            images = torch.cat([images, self.counterfactual_images(images, batch["meta"])])
        z_all_img, z_all_txt, logit_scale = self.encode(images, captions + negatives)
        z_img, z_neg_img = z_all_img[:len(captions)], z_all_img[len(captions):]
        z_txt, z_neg = z_all_txt[:len(captions)], z_all_txt[len(captions):]
        rank, world = (self.global_rank, self.trainer.world_size) if self._trainer is not None else (0, 1)
        if world > 1:
            gather = lambda z: gather_features(z, z, local_loss=True, gather_with_grad=True, rank=rank, world_size=world)[0]  # noqa: E731
            all_img, all_txt, all_neg, all_neg_img = gather(z_img), gather(z_txt), gather(z_neg), gather(z_neg_img)
        else:
            all_img, all_txt, all_neg, all_neg_img = z_img, z_txt, z_neg, z_neg_img
        loss = contrastive_loss_with_negatives(z_img, z_txt, all_img, all_txt, all_neg, logit_scale, rank * len(z_img),
                                               all_neg_img)
        return loss, logit_scale

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hard_negatives or self.image_negatives:
            loss, logit_scale = self.hard_negative_loss(batch)
        else:
            z_img, z_txt, logit_scale = self.encode(batch["image"], batch["caption"])
            loss = self.loss_fn(z_img, z_txt, logit_scale)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        self.log("train/logit_scale", logit_scale.detach())
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        store = self._val.setdefault(dataloader_idx, {"img": [], "txt": [], "meta": []})
        if sum(len(x) for x in store["img"]) >= self.retrieval_pool:
            return
        z_img, z_txt, logit_scale = self.encode(batch["image"], batch["caption"])
        self.log(f"val/loss{self.split_suffix(dataloader_idx)}", self.loss_fn(z_img, z_txt, logit_scale),
                 add_dataloader_idx=False, batch_size=len(z_img))
        store["img"].append(z_img.float())
        store["txt"].append(z_txt.float())
        store["meta"] += batch.get("meta", [{}] * len(z_img))

    def on_validation_epoch_end(self) -> None:
        for idx, store in self._val.items():
            suffix = self.split_suffix(idx)
            z_img = torch.cat(store["img"])[: self.retrieval_pool]
            z_txt = torch.cat(store["txt"])[: self.retrieval_pool]
            for k, value in retrieval_topk(z_txt, z_img).items():
                self.log(f"val/clip/retrieval_top{k}{suffix}", value, add_dataloader_idx=False)
            encode = lambda texts: self.model.encode_text(self.tokenizer(texts).to(self.device))  # noqa: E731
            for attribute, value in zero_shot_attributes(encode, z_img, store["meta"][: self.retrieval_pool]).items():
                self.log(f"val/clip/zeroshot_{attribute}{suffix}", value, add_dataloader_idx=False)
        self._val = {}

    def publish(self, path) -> None:
        save_published(self.model, self.model_name, path)
