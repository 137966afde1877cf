"""Reading earlier runs: a stage that starts from another run (`model.init_from`,
`ppo.reward_model`) learns from that run's saved config what base model and adapters it
stands on, so users never copy adapter paths by hand."""

from pathlib import Path

from omegaconf import OmegaConf

from rlhf.errors import UserError


def finished_run(path, key: str, stages: tuple = ()):
    """The saved config of the finished run at `path`; `key` names the setting that pointed
    there, for the error message; `stages` limits which stages may be named."""
    run_dir = Path(str(path)).expanduser()
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{key}={path}: not a run directory (no .hydra/config.yaml there)")
    if not (run_dir / "metrics.json").is_file() or not (run_dir / "final").is_dir():
        raise UserError(f"{key}={path}: that run did not finish (no metrics.json or final/); run it to the end first")
    cfg = OmegaConf.load(saved)
    if stages and cfg.get("stage") not in stages:
        raise UserError(f"{key}={path}: that is a stage={cfg.get('stage')} run; expected one of: {', '.join(stages)}")
    return cfg


def policy_lineage(model_cfg) -> tuple:
    """(the config of the base model, the adapter directories to merge into it, in order).

    A run started with `model.init_from=<run>` stands on that run's final weights: a full model
    becomes the new base; a LoRA adapter is merged into its own base. Merging keeps one copy
    of the weights in memory, and makes "adapter disabled" mean "the starting policy", so
    DPO's and PPO's reference is the SFT policy, not the raw base model.
    """
    init_from = model_cfg.get("init_from")
    if not init_from:
        return model_cfg, []
    earlier = finished_run(init_from, "model.init_from", stages=("sft", "dpo", "ppo"))
    base_cfg, adapters = policy_lineage(earlier.model)
    final = Path(str(init_from)).expanduser() / "final"
    if (final / "adapter_config.json").is_file():
        return base_cfg, [*adapters, final]
    full_model = OmegaConf.merge(base_cfg, {"name_or_path": str(final), "init_from": None})
    return full_model, []
