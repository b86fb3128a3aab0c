"""How well the published decoder draws val images from their own z_i, per decoder guidance scale: the
attribute classifier on the decodings (against the attributes of the images whose z_i they decode) and
clip_sim = cos(CLIP(decoded), z_i), next to the same numbers for the real images at 32 px. It is the
decoder's validation measurement over more images than a training run's validation decodes.

    python -m bench.decode_val n=128 guidance=[1,5]        (needs make demo's published stages)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import unclip
from unclip.eval.attributes import attribute_accuracy, load_classifier
from unclip.demo import PROFILES, ROOT
from unclip.eval.tables import markdown

ARTIFACTS = ROOT / PROFILES["full"]["root"] / "artifacts"  # what `make demo` publishes


def scores(classifier, clip, images: torch.Tensor, z_img: torch.Tensor, objects: list) -> dict:
    accuracy = attribute_accuracy(classifier, images, objects)
    sim = (clip.encode_image(images) * F.normalize(z_img.float(), dim=-1)).sum(-1).mean()
    return {"attr_acc": float(accuracy["attr_acc"]), "shape": float(accuracy["attr_shape"]),
            "colour": float(accuracy["attr_color"]), "clip_sim": float(sim)}


@torch.no_grad()
def main(n: int = 128, guidance=(1.0, 5.0), seed: int = 0) -> list[dict]:
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=["model=decoder"])
    torch.manual_seed(cfg.seed)
    clip = instantiate(cfg.clip, _convert_="all")
    decoder = unclip.load("decoder", clip=clip, artifacts=ARTIFACTS)
    classifier = load_classifier(ARTIFACTS / "attributes" / "shapes.pt")
    rows = []
    for split in ("val", "val_unseen"):
        data = instantiate(cfg.data, _convert_="all", train=cfg.data[split], batch_size=n, image_size=cfg.model.image_size,
                           fields=["image", "img_emb", "caption", "meta"])
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        objects = [m["objects"] for m in batch["meta"]]
        rows.append({"split": split, "images": "real", **scores(classifier, clip, batch["image"].float(), batch["img_emb"], objects)})
        for scale in guidance:
            decoded = decoder.sample(batch["img_emb"], batch["caption"], torch.Generator().manual_seed(seed), float(scale))
            rows.append({"split": split, "images": f"decoded, guidance {scale:g}",
                         **scores(classifier, clip, decoded, batch["img_emb"], objects)})
    print(markdown(rows, ["split", "images", "attr_acc", "shape", "colour", "clip_sim"]), end="")
    return rows


if __name__ == "__main__":
    options = OmegaConf.from_dotlist(sys.argv[1:])
    scales = options.get("guidance", [1.0, 5.0])
    main(int(options.get("n", 128)), tuple(scales) if OmegaConf.is_list(scales) else (scales,), int(options.get("seed", 0)))
