"""The one entry point: compose the Hydra config and run the chosen stage.

    python train.py                               # SFT on the built-in tiny model and data
    python train.py stage=dpo dpo.beta=0.1,0.3 -m # a sweep
"""

import hydra

from rlhf.run import main as run_main


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    return run_main(cfg)


if __name__ == "__main__":
    main()
