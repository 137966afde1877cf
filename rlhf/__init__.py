"""RLHF experiments on transformers + trl + peft, configured by Hydra (see README.md)."""

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]

# `${project_root:}` lets conf/config.yaml put the top-level sweeps/ folder on Hydra's search
# path wherever the command is started from.
OmegaConf.register_new_resolver("project_root", lambda: PROJECT_ROOT.as_posix(), replace=True)
