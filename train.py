"""Train one unclip stage: compose the Hydra config, then fit.

    python train.py model=clip_pretrain                   # the tiny CLIP on shapes
    python train.py --cfg job                             # every knob with its default
    python train.py -m model=clip_pretrain optim.optimizer.lr=1e-4,3e-4   # a sweep
"""

import hydra
from omegaconf import DictConfig

from unclip.cli import user_errors
from unclip.training import fit


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> float | None:
    metrics = fit(cfg)
    return metrics.get("val/loss")


if __name__ == "__main__":
    main()
