"""The one entry point: compose the Hydra config and run the chosen stage.

python train.py                                # SFT on the built-in tiny model and data
python train.py stage=dpo dpo.beta=0.1,0.3 -m  # a sweep: one run directory per value
"""

import contextlib
import sys

import hydra

from rlhf.command import main as run_main
from rlhf.compose import check_command_line, help_text
from rlhf.errors import exit_on_user_error


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg):
    return run_main(cfg)


if __name__ == "__main__":
    # Hydra's parser takes flags only before the overrides; let -m/--multirun stand anywhere.
    multirun = [arg for arg in sys.argv[1:] if arg in ("-m", "--multirun")]
    sys.argv = [sys.argv[0], *multirun, *(arg for arg in sys.argv[1:] if arg not in multirun)]
    if {"--help", "-h"} & set(sys.argv[1:]):  # the project's groups, not Hydra's internal ones (--hydra-help: Hydra's own)
        with contextlib.suppress(BrokenPipeError):  # `--help | head` is not an error
            print(help_text(), flush=True)
        raise SystemExit(0)
    with exit_on_user_error():
        check_command_line(sys.argv[1:])  # Hydra's composition errors in one line; no foreign _target_ reaches Hydra
    main()
