"""Sample from a trained unCLIP pipeline: a PNG grid (one row per prompt or input) and a JSON of settings.

    python sample.py prompts='["a red circle", "a small blue star in the top left"]' prior=diffusion n=4
    python sample.py mode=vary images=[outputs/demo/a.png] n=8
    python sample.py mode=interpolate images=[a.png,b.png] k=7 invert=true
    python sample.py mode=text_diff images=[a.png] caption_from="a red circle" caption_to="a blue circle"
"""

import hydra
from omegaconf import DictConfig

from unclip.cli import user_errors
from unclip.sampling import sample


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    sample(cfg)


if __name__ == "__main__":
    main()
