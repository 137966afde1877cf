"""The settings of `stage=ppo` (conf/ppo/default.yaml documents each key), and what a run says
about them at its start."""

from dataclasses import dataclass

from rlhf.generation import SamplingSettings
from rlhf.runs import is_main_process


@dataclass
class PPOConfig(SamplingSettings):
    """Settings of `stage=ppo`, defaulting to what conf/ppo/default.yaml gives a real model (a
    test holds them equal; the YAML documents each key)."""

    reward_model: str | None = None
    total_updates: int = 100
    batch_size: int = 8
    mini_batch_size: int = 1
    ppo_epochs: int = 4
    learning_rate: float = 5e-5
    max_grad_norm: float = 1.0
    max_prompt_length: int = 512
    max_new_tokens: int = 128
    temperature: float = 1.0
    missing_eos_penalty: float | None = None
    whiten_scores: bool = True
    kl_coef: float = 0.1
    adaptive_kl: bool = True
    target: float = 6.0
    horizon: float = 64.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    eval_prompts: int = 128
    logging_steps: int = 1
    save_steps: int = 10
    save_total_limit: int = 1


MIN_REACH = 2.0  # an adaptive controller that cannot at least double or halve kl_coef over the run steers nothing


def say_if_the_kl_controller_cannot_move(controller, settings) -> None:
    """One line at the start when the adaptive KL controller cannot reach its target within the
    run: Ziegler et al.'s horizon (10000 samples) at a batch of 8 moves kl_coef by under 2% over
    100 updates, so the KL ends where kl_coef puts it, not at ppo.target."""
    up, down = controller.reach(settings.batch_size, settings.total_updates)
    if up >= MIN_REACH and down <= 1 / MIN_REACH:
        return
    suggested = controller.horizon_to_reach(settings.batch_size, settings.total_updates)
    if is_main_process():
        print(
            f"ppo: kl_coef cannot follow ppo.target={settings.target}: over {settings.total_updates} updates of "
            f"{settings.batch_size} samples, ppo.horizon={settings.horizon:g} lets it move by at most x{up:.3f} up and "
            f"x{down:.3f} down; ppo.horizon={suggested:.0f} lets it grow 10x",
            flush=True,
        )
