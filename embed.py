"""Embed caption-image shards with a frozen CLIP into the chunked embedding cache (resumable, per shard).

    python embed.py                                   # data=shapes, clip=shapes_tiny
    python embed.py data=webdataset data.train='/data/{00000..00999}.tar' clip=vit_b_32
"""

import hydra
from omegaconf import DictConfig

from unclip.cli import user_errors
from unclip.embed import embed


@hydra.main(config_path="conf", config_name="embed", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    meta = embed(cfg)
    print(f"cache {cfg.data.cache_dir}: {meta['embedded']} samples, {meta['skipped_total']} skipped, dim {meta['dim']}")


if __name__ == "__main__":
    main()
