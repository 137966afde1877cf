"""One run's context, decided once by `rlhf.command` after validation: where the run computes,
in what precision, whether this process writes its files, and every finished run its config
names - each opened and checked against what it recorded once (`rlhf.lineage.TrainedRun`).
The stages, `rlhf.reuse` and `rlhf.lifecycle` read it; none of them derives it again."""

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from rlhf import bf16_autocast, precision
from rlhf.lineage import TrainedRun
from rlhf.runs import RUN_INPUTS, is_main_process


@dataclass(frozen=True)
class RunContext:
    cfg: object  # the run's composed config
    run_dir: Path
    device: torch.device  # where a stage that drives its own loop (PPO, eval, held-out scoring) computes
    precision: str  # the weights' dtype and autocast, as env.json and the start line say
    bf16_autocast: bool  # hardware.training_args.bf16: the Trainer stages compute under it, and so do the own loops
    main_process: bool  # this process writes the run's files (rank 0 of a launch)
    runs: dict = field(default_factory=dict)  # setting -> TrainedRun: every finished run the config names

    @classmethod
    def open(cls, cfg, run_dir) -> "RunContext":
        """The context of a run of `cfg` in `run_dir`; every earlier run it names is opened here, once."""
        autocasts = bf16_autocast(cfg.hardware)
        return cls(cfg, Path(run_dir), device_for(cfg), precision(cfg), autocasts, is_main_process(), open_runs(cfg))

    def autocast(self):
        """bfloat16 autocast for a stage that drives its own loop (PPO, eval, held-out scoring), on
        exactly when the Trainer stages get it: hardware.training_args.bf16.

        Without autocast's weight cache: the cache keeps the bfloat16 copy of every trainable weight
        (LoRA's matrices, the value head) made at its first use until the outermost autocast block
        ends. PPO trains inside one block, so with the cache every forward pass - rollouts, the
        losses, the held-out scores after training - kept computing with the starting adapter: the
        policy never moved (approxkl and KL exactly 0) while its saved weights did. The Trainer
        stages enter autocast once per step and never saw this."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16_autocast, cache_enabled=False)


def open_runs(cfg) -> dict:
    """Every finished run `cfg` names (model.init_from, ppo.reward_model, eval.policy, ...), by the
    setting naming it: opened and checked against what it recorded it was trained on."""
    runs = {}
    for key, (_, stages) in RUN_INPUTS.items():
        path = OmegaConf.select(cfg, key)
        if path:
            runs[key] = TrainedRun.of(path, key, stages)
    return runs


def device_for(cfg) -> torch.device:
    """Where a stage that drives its own loop (PPO, eval) computes: a GPU when the hardware
    preset uses one and there is one (under torchrun, the process's own)."""
    if not torch.cuda.is_available() or cfg.hardware.training_args.use_cpu:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # a launch's process uses its own GPU
