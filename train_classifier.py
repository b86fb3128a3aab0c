"""Train the shapes attribute classifier, the evaluator that reads shape, colour, size and position
from generated images (``unclip.eval.attributes``).

    python train_classifier.py                        # data=shapes, writes outputs/artifacts/attributes/shapes.pt
    python train_classifier.py data.train='/d/train-*.tar' data.val='/d/val-*.tar' out=/x.pt
"""

import hydra
from omegaconf import DictConfig

from unclip.cli import user_errors
from unclip.eval.attributes.training import run


@hydra.main(config_path="conf", config_name="attributes", version_base="1.3")
@user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
