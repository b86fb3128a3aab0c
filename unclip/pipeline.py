"""Text to image through the CLIP latent space (unCLIP): prior, decoder, optional upsamplers.

    pipe = UnCLIPPipeline.from_checkpoints(prior="diffusion", decoder="decoder", upsamplers=["upsampler"])
    out = pipe.generate(["a red circle"], n=4, seed=0)      # out.images: PIL; out.z_img: (4, D)
    pipe.vary(image, n=4); pipe.interpolate(a, b, k=5); pipe.text_diff(image, "a red circle", "a blue circle")
    pipe.save_pretrained("my_unclip"); UnCLIPPipeline.from_pretrained("my_unclip")

Every stage is loaded by :func:`unclip.load` (EMA weights, ``weights_only=True``) and must have been
trained with the same CLIP; the pipeline refuses a mixture, naming the stage. Results are deterministic
for a seed: one generator drives the prior, the decoder and the upsamplers in that order.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from unclip import registry
from unclip.loading import check_clip, load, pick_device
from unclip.precision import resolve_precision, sampling_autocast

MANIFEST = "unclip_pipeline.json"


@dataclass
class UnCLIPOutput:
    images: list[Image.Image]       # final images, row-major: input i's samples at [i * n, (i + 1) * n)
    pixels: torch.Tensor            # (B, 3, H, W) in [-1, 1], the same images
    z_img: torch.Tensor             # (B, D) the image embeddings that were decoded
    z_txt: torch.Tensor | None = None  # (B, D) the prompts' text embeddings, when there were prompts


def slerp(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Spherical interpolation of unit vectors (B, D) at fractions ``theta`` in [0, 1] (unCLIP §3 eq. for
    z_θ = slerp(z_i1, z_i2, θ)); falls back to a linear blend when the vectors are (anti)parallel."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    theta = torch.as_tensor(theta, dtype=a.dtype, device=a.device).reshape(-1, 1)
    omega = torch.arccos((a * b).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    mixed = (torch.sin((1 - theta) * omega) * a + torch.sin(theta * omega) * b) / so
    linear = (1 - theta) * a + theta * b
    return F.normalize(torch.where(so.abs() < 1e-4, linear, mixed), dim=-1)


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL RGB images."""
    data = pixels.detach().float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(row) for row in data]


def to_tensor(images, size: int | None = None) -> torch.Tensor:
    """PIL images, a path, or a tensor in [-1, 1] -> (B, 3, H, W) in [-1, 1] (resized to ``size`` when given)."""
    if isinstance(images, torch.Tensor):
        x = images[None] if images.dim() == 3 else images
    else:
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        rows = []
        for image in images:
            image = Image.open(image) if isinstance(image, (str, Path)) else image
            array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
            rows.append(array.view(image.height, image.width, 3).permute(2, 0, 1).float() / 127.5 - 1)
        if len({r.shape for r in rows}) > 1 and size is None:
            size = rows[0].shape[-1]
        x = torch.stack([resize(r[None], size)[0] for r in rows]) if size else torch.stack(rows)
    return resize(x.float(), size) if size else x.float()


def resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def inverted_guidance(inverted: bool, guidance: float | None) -> float | None:
    """The decoder guidance for a start latent: DDIM inversion (unguided) reconstructs an image only under
    the model function it was run with, so inverted latents decode unguided unless a scale is asked for."""
    return 1.0 if inverted and guidance is None else guidance


def expect_stage(module, role: str, spec) -> object:
    """``module`` if it plays ``role`` (``prior``: any registered prior kind; else the kind itself)."""
    fits = registry.is_prior(module.kind) if role == "prior" else registry.plays(module.kind, role)
    if not fits:
        raise ValueError(f"{role}={spec} is a {module.kind} stage, not a {role}")
    return module


def best_of_candidates(pipe: "UnCLIPPipeline", drawn: UnCLIPOutput, k: int) -> UnCLIPOutput:
    """Of each run of k consecutive candidates, the one whose pixels CLIP embeds closest to its prompt's z_t:
    CLIP reranking (DALL-E, Ramesh et al. 2021 §2.5), here with the pipeline's own CLIP. It catches what the
    embedding cannot say: a second blob, a faded object, a colour on the wrong shape."""
    z_pix = pipe.clip.encode_image(drawn.pixels.to(pipe.device))
    scores = (z_pix * drawn.z_txt.to(z_pix)).sum(-1).view(-1, k)
    keep = (scores.argmax(1) + torch.arange(len(scores), device=scores.device) * k).cpu()
    return UnCLIPOutput([drawn.images[i] for i in keep.tolist()], drawn.pixels[keep], drawn.z_img[keep.to(drawn.z_img.device)],
                        drawn.z_txt[keep.to(drawn.z_txt.device)])


def embedding_of(upsampler, z_img: torch.Tensor, weights: torch.Tensor | None) -> dict:
    """What an upsampler that reads z_i (``image_cond``) is given: the embeddings the images were decoded from; a
    conjunction's image (z_img (K, B, D)) the normalised mean of its parts'."""
    if not getattr(upsampler, "image_cond", False):
        return {}
    return {"z_img": F.normalize(z_img.float().mean(0), dim=-1) if weights is not None else z_img}


class UnCLIPPipeline:
    """The frozen CLIP and the trained stages, on one device, in eval mode. ``precision``: what the prior,
    decoder and upsamplers sample in, ``32-true``, ``bf16-mixed`` (autocast: bf16 matmuls and convolutions,
    fp32 weights and sampler updates) or ``auto`` (bf16-mixed on a GPU or a CPU with native bf16)."""

    def __init__(self, clip, decoder, prior=None, upsamplers: Sequence = (), device: str | torch.device = "cpu",
                 precision: str = "32-true"):
        identity = decoder.hparams.get("clip") or {}
        for name, stage in [("prior", prior), *[(f"upsampler {i}", u) for i, u in enumerate(upsamplers)]]:
            other = (stage.hparams.get("clip") or {}) if stage is not None else {}
            if identity.get("sha256") and other.get("sha256") and other["sha256"] != identity["sha256"]:
                raise ValueError(f"the {name} was trained with CLIP {other.get('model')} (weights {other['sha256'][:12]}) "
                                 f"but the decoder with {identity.get('model')} (weights {identity['sha256'][:12]}); "
                                 f"every stage of a pipeline must share one CLIP")
        check_clip(clip, identity)
        self.clip, self.decoder, self.prior, self.upsamplers = clip, decoder, prior, list(upsamplers)
        resolve_precision(precision)  # checked now; ``auto`` is made concrete for the device when sampling
        self.precision = precision
        for stage in (decoder, *self.upsamplers):
            if hasattr(stage.net, "use_channels_last"):  # unclip's UNets sample in NHWC (converted nets keep theirs)
                stage.net.use_channels_last()
        self.to(device)

    # ------------------------------------------------------------------------------ building
    @classmethod
    def from_checkpoints(cls, decoder: str | Path = "decoder", prior: str | Path | None = "diffusion",
                         upsamplers: Sequence[str | Path] = (), clip=None, device: str | torch.device = "cpu",
                         artifacts: str | Path = "outputs/artifacts", precision: str = "32-true") -> "UnCLIPPipeline":
        """Stages by path or published name (``diffusion``, ``ar``, ``contrastive``, ``decoder/NAME``...).
        The CLIP is rebuilt from the decoder's identity unless given; every stage is checked against it."""
        decoder_module = expect_stage(load(decoder, clip=clip, artifacts=artifacts), "decoder", decoder)
        clip = decoder_module.clip if clip is None else clip
        prior_module = None if prior is None else expect_stage(load(prior, clip=clip, artifacts=artifacts), "prior", prior)
        ups = [expect_stage(load(spec, clip=clip, artifacts=artifacts), "upsampler", spec) for spec in upsamplers]
        return cls(clip, decoder_module, prior_module, ups, device, precision)

    def save_pretrained(self, directory: str | Path) -> Path:
        """One folder: every stage's checkpoint, the CLIP (open_clip state dict + config) and a manifest."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {"decoder": "decoder.ckpt", "prior": None, "upsamplers": []}
        shutil.copyfile(self.decoder.checkpoint_path, directory / "decoder.ckpt")
        if self.prior is not None:
            manifest["prior"] = "prior.ckpt"
            shutil.copyfile(self.prior.checkpoint_path, directory / "prior.ckpt")
        for i, upsampler in enumerate(self.upsamplers):
            manifest["upsamplers"].append(f"upsampler_{i}.ckpt")
            shutil.copyfile(upsampler.checkpoint_path, directory / f"upsampler_{i}.ckpt")
        pretrained = self.clip.pretrained
        if pretrained and Path(pretrained).exists():
            # a published CLIP's model name is its file stem, which is part of its identity: keep the name
            source = Path(pretrained)
            for suffix in (".pt", ".json"):
                if source.with_suffix(suffix).exists():
                    shutil.copyfile(source.with_suffix(suffix), directory / source.with_suffix(suffix).name)
            manifest["clip"] = {"pretrained": source.name}
        else:  # an open_clip name + pretrained tag: named, not copied
            manifest["clip"] = {"model_name": self.clip.model_name, "pretrained": pretrained,
                                "init_seed": self.clip.random_init_seed}
        manifest["clip"]["identity"] = self.clip.identity()
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu",
                        precision: str = "32-true") -> "UnCLIPPipeline":
        from unclip.clip import FrozenCLIP

        directory = Path(directory)
        if not (directory / MANIFEST).exists():
            raise FileNotFoundError(f"{directory} holds no {MANIFEST}; write one with UnCLIPPipeline.save_pretrained")
        manifest = json.loads((directory / MANIFEST).read_text())
        spec = manifest["clip"]
        if spec.get("model_name"):
            clip = FrozenCLIP(spec["model_name"], spec.get("pretrained"), init_seed=spec.get("init_seed") or 0)
        else:
            clip = FrozenCLIP(pretrained=str(directory / spec["pretrained"]))
        return cls.from_checkpoints(decoder=directory / manifest["decoder"],
                                    prior=directory / manifest["prior"] if manifest.get("prior") else None,
                                    upsamplers=[directory / u for u in manifest.get("upsamplers", [])], clip=clip,
                                    device=device, precision=precision)

    def to(self, device) -> "UnCLIPPipeline":
        """``device``: a torch device, or ``auto`` for the GPU when there is one."""
        self.device = pick_device(device)
        self.clip.to(self.device)
        for stage in (self.decoder, self.prior, *self.upsamplers):
            if stage is not None:
                stage.to(self.device)
        return self

    @property
    def image_size(self) -> int:
        return self.upsamplers[-1].image_size if self.upsamplers else self.decoder.net.config.image_size

    # --------------------------------------------------------------------------------- stages
    def autocast(self):
        """The context the nets sample in (see ``precision``)."""
        return sampling_autocast(self.precision, self.device)

    def generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None:
            return generator
        return torch.Generator(device=self.device).manual_seed(0 if seed is None else seed)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> dict:
        """The prior's condition for prompts: z_t and (when the prior uses them) token states."""
        if self.prior is None:
            raise ValueError(f"this pipeline has no prior: build it with prior={registry.prior_names()}|PATH")
        z_txt = self.clip.encode_text(list(prompts)).z_txt
        return self.prior.condition({"txt_emb": z_txt, "caption": list(prompts)})

    @torch.no_grad()
    def prior_sample(self, prompts: Sequence[str], generator: torch.Generator, guidance_scale: float | None = None,
                     steps: int | str | None = None, negative_prompt: str | None = None) -> torch.Tensor:
        """ẑ_i (B, D), unit norm, one per prompt."""
        cond = self.text_embeddings(prompts)
        options = {"guidance_scale": guidance_scale}
        if steps is not None:
            options["steps"] = steps
        if negative_prompt is not None:
            options["negative"] = self.text_embeddings([negative_prompt] * len(prompts))
        return self.draw_embeddings(cond, generator, **options)

    @torch.no_grad()
    def draw_embeddings(self, cond: dict, generator: torch.Generator, **options) -> torch.Tensor:
        """ẑ_i (B, D), unit norm, from the prior's condition (``text_embeddings``), in the pipeline's precision."""
        with self.autocast():
            z_img = self.prior.sample(cond, generator, **options)
        return F.normalize(z_img.float(), dim=-1)

    @torch.no_grad()
    def decode(self, z_img: torch.Tensor, generator: torch.Generator, guidance_scale: float | None = None,
               steps: int | str | None = None, captions: Sequence[str] | None = None, x_T: torch.Tensor | None = None,
               eta: float | None = None, upsampler_steps: int | str | None = None,
               weights: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1]: the decoder at its resolution, then each upsampler in turn. With
        ``weights`` (K, B) or (K, B, 1, h, w) each image is a conjunction (``unclip.composition``): z_img (K, B, D),
        K caption lists."""
        captions = list(captions) if captions is not None and self.decoder.text_cond else None
        with self.autocast():
            x = self.decoder.sample(z_img.to(self.device), captions, generator, guidance_scale, steps, x_T, eta,
                                    weights=weights)
            for upsampler in self.upsamplers:
                x = upsampler.upsample(x, steps=upsampler_steps, generator=generator, **embedding_of(upsampler, z_img, weights))
        return x.float()

    # ---------------------------------------------------------------------------------- modes
    def generate(self, prompts: str | Sequence[str], n: int = 1, seed: int | None = 0, generator: torch.Generator | None = None,
                 prior_guidance: float | None = None, decoder_guidance: float | None = None,
                 prior_steps: int | str | None = None, decoder_steps: int | str | None = None,
                 upsampler_steps: int | str | None = None, negative_prompt: str | None = None,
                 decoder_noise: torch.Tensor | None = None, compose: Callable[[str], Sequence[str]] | None = None,
                 layout: bool = False, rerank: int = 1, complete: Callable[[str, random.Random], str] | None = None) -> UnCLIPOutput:
        """n images per prompt: prior ẑ_i ~ p(z_i | y), then the decoder (and upsamplers) x ~ p(x | ẑ_i, y).
        ``compose`` splits a prompt into parts (``unclip.composition.split_and``, ``object_phrases``): a prompt of
        several parts is sampled as their conjunction, a prior draw for each and one decode guided towards all;
        with ``layout`` each part is guided towards near the cell its words name ("in the top left") and not
        elsewhere (``unclip.composition.layout_weights``). ``rerank`` > 1 draws that many candidates per image and
        keeps the one CLIP finds closest to its prompt (:func:`best_of_candidates`). ``complete`` fills in, for each
        image, what its prompt leaves open (``unclip.completion.complete_shapes``: a size, a cell) before sampling;
        ``z_txt`` stays the prompt's as asked."""
        if layout and compose is None:
            raise ValueError("layout=True places the parts of a composed prompt: it needs compose= (a prompt splitter)")
        if rerank < 1:
            raise ValueError(f"rerank={rerank}: the candidates per image must be at least 1")
        if rerank > 1:
            if decoder_noise is not None:
                raise ValueError("rerank draws its own decoder noise for every candidate: leave decoder_noise unset")
            options = dict(seed=seed, generator=generator, prior_guidance=prior_guidance, decoder_guidance=decoder_guidance,
                           prior_steps=prior_steps, decoder_steps=decoder_steps, upsampler_steps=upsampler_steps,
                           negative_prompt=negative_prompt, compose=compose, layout=layout, complete=complete)
            return best_of_candidates(self, self.generate(prompts, n=n * rerank, **options), rerank)
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        asked = [p for p in prompts for _ in range(n)]
        generator = self.generator(seed, generator)
        repeated = asked
        if complete is not None:  # one draw per image, from the sampling generator: seeded like the noise
            rng = random.Random(int(torch.randint(2**62, (1,), generator=generator, device=generator.device)))
            repeated = [complete(p, rng) for p in asked]
        if compose is not None:
            from unclip.composition import generate_composed

            prior_options = {"guidance_scale": prior_guidance, "steps": prior_steps, "negative_prompt": negative_prompt}
            decode_options = {"guidance_scale": decoder_guidance, "steps": decoder_steps, "x_T": decoder_noise,
                              "upsampler_steps": upsampler_steps}
            pixels, z_img = generate_composed(self, repeated, compose, generator, prior_options, decode_options, layout)
        else:
            z_img = self.prior_sample(repeated, generator, prior_guidance, prior_steps, negative_prompt)
            pixels = self.decode(z_img, generator, decoder_guidance, decoder_steps, repeated, decoder_noise,
                                 upsampler_steps=upsampler_steps)
        z_txt = self.clip.encode_text(asked).z_txt
        return UnCLIPOutput(to_pil(pixels), pixels, z_img, z_txt)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        return self.clip.encode_image(to_tensor(images).to(self.device))

    def invert(self, images, z_img: torch.Tensor, steps: int | str | None = None) -> torch.Tensor:
        """The decoder's DDIM latents x_T of images (B, 3, h, w) under their embeddings."""
        return self.decoder.invert(to_tensor(images).to(self.device), z_img, steps=steps)

    def vary(self, image, n: int = 4, seed: int | None = 0, generator: torch.Generator | None = None, invert: bool = False,
             eta: float | None = None, decoder_guidance: float | None = None, decoder_steps: int | str | None = None,
             upsampler_steps: int | str | None = None) -> UnCLIPOutput:
        """Variations of one image (unCLIP §3.1): decode its z_i with new noise. ``invert=True`` starts every
        sample from the image's own DDIM latent instead, so the layout stays and only details change
        (with ``eta`` > 0; default 0.5 there, and the sampler's own eta otherwise)."""
        generator = self.generator(seed, generator)
        z_img = self.image_embeddings(image)[:1].repeat(n, 1)
        x_T = None
        if invert:
            x_T = self.invert(to_tensor(image)[:1], z_img[:1], decoder_steps).repeat(n, 1, 1, 1)
            eta = 0.5 if eta is None else eta
        pixels = self.decode(z_img, generator, inverted_guidance(invert, decoder_guidance), decoder_steps, x_T=x_T, eta=eta,
                             upsampler_steps=upsampler_steps)
        return UnCLIPOutput(to_pil(pixels), pixels, z_img)

    def interpolate(self, image_a, image_b, k: int = 5, seed: int | None = 0, generator: torch.Generator | None = None,
                    invert: bool = False, decoder_guidance: float | None = None, decoder_steps: int | str | None = None,
                    upsampler_steps: int | str | None = None) -> UnCLIPOutput:
        """k images along z_θ = slerp(z_a, z_b, θ), θ = 0 .. 1 (unCLIP §3.2). The decoder noise is one fixed
        draw for every θ, or with ``invert=True`` the slerp of the two images' DDIM latents."""
        generator = self.generator(seed, generator)
        z_a, z_b = self.image_embeddings(image_a)[:1], self.image_embeddings(image_b)[:1]
        theta = torch.linspace(0, 1, k, device=self.device)
        z_img = slerp(z_a.expand(k, -1), z_b.expand(k, -1), theta)
        size = self.decoder.net.config.image_size
        if invert:
            x_a = self.invert(to_tensor(image_a)[:1], z_a, decoder_steps).flatten(1)
            x_b = self.invert(to_tensor(image_b)[:1], z_b, decoder_steps).flatten(1)
            norm = (x_a.norm() + x_b.norm()) / 2  # Gaussian latents: interpolate directions, keep the typical norm
            x_T = (slerp(x_a.expand(k, -1), x_b.expand(k, -1), theta) * norm).view(k, 3, size, size)
        else:
            x_T = torch.randn(1, 3, size, size, generator=generator, device=self.device).expand(k, -1, -1, -1)
        pixels = self.decode(z_img, generator, inverted_guidance(invert, decoder_guidance), decoder_steps, x_T=x_T,
                             upsampler_steps=upsampler_steps)
        return UnCLIPOutput(to_pil(pixels), pixels, z_img)

    def text_diff(self, image, caption_from: str, caption_to: str, k: int = 5, max_theta: float = 0.5,
                  seed: int | None = 0, generator: torch.Generator | None = None, invert: bool = True,
                  decoder_guidance: float | None = None, decoder_steps: int | str | None = None,
                  upsampler_steps: int | str | None = None) -> UnCLIPOutput:
        """Language-guided edits (unCLIP §3.3): the text diff z_d = norm(z_t(to) − z_t(from)), and
        z_θ = slerp(z_i, z_d, θ) for θ from 0 to ``max_theta``, decoded from the image's DDIM latent
        (``invert=True``, as the paper) or one fixed noise draw."""
        generator = self.generator(seed, generator)
        z_i = self.image_embeddings(image)[:1]
        z_t = self.clip.encode_text([caption_from, caption_to]).z_txt
        z_d = F.normalize(z_t[1:] - z_t[:1], dim=-1)
        theta = torch.linspace(0, max_theta, k, device=self.device)
        z_img = slerp(z_i.expand(k, -1), z_d.expand(k, -1), theta)
        size = self.decoder.net.config.image_size
        if invert:
            x_T = self.invert(to_tensor(image)[:1], z_i, decoder_steps).expand(k, -1, -1, -1)
        else:
            x_T = torch.randn(1, 3, size, size, generator=generator, device=self.device).expand(k, -1, -1, -1)
        pixels = self.decode(z_img, generator, inverted_guidance(invert, decoder_guidance), decoder_steps, x_T=x_T,
                             upsampler_steps=upsampler_steps)
        return UnCLIPOutput(to_pil(pixels), pixels, z_img)

    def mix(self, images_and_prompts: Sequence, weights: Sequence[float] | None = None, n: int = 1, seed: int | None = 0,
            generator: torch.Generator | None = None, prior_guidance: float | None = None,
            decoder_guidance: float | None = None, decoder_steps: int | str | None = None,
            upsampler_steps: int | str | None = None) -> UnCLIPOutput:
        """Decode a weighted mix of image embeddings: images give their z_i, prompts a prior sample."""
        generator = self.generator(seed, generator)
        weights = [1.0] * len(images_and_prompts) if weights is None else list(weights)
        if len(weights) != len(images_and_prompts):
            raise ValueError(f"mix got {len(images_and_prompts)} inputs but {len(weights)} weights")
        parts = []
        for item in images_and_prompts:
            if isinstance(item, str):
                parts.append(self.prior_sample([item], generator, prior_guidance))
            else:
                parts.append(self.image_embeddings(item)[:1])
        z = sum(w * p for w, p in zip(weights, parts))
        z_img = F.normalize(z, dim=-1).repeat(n, 1)
        pixels = self.decode(z_img, generator, decoder_guidance, decoder_steps, upsampler_steps=upsampler_steps)
        return UnCLIPOutput(to_pil(pixels), pixels, z_img)

