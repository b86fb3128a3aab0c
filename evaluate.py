"""Evaluate priors and decoders on one protocol: the same val pools, seeds and metric names for every stage.

    python evaluate.py mode=compare priors=[diffusion,ar]            # prior metrics side by side, with baselines
    python evaluate.py leaderboard priors=[diffusion,ar,contrastive] # a bare first word is the mode
    python evaluate.py mode=images prior=diffusion decoder=decoder n=2
    python evaluate.py mode=steps prior=diffusion decoder=decoder
"""

import sys

import hydra
from omegaconf import DictConfig

from unclip.cli import user_errors
from unclip.eval.run import mode_word_as_override, run


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv = mode_word_as_override(sys.argv)
    main()
