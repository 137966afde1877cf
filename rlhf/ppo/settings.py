"""The settings of `stage=ppo` (conf/ppo/default.yaml documents each key), the values they accept,
and what a run says about them at its start. Imports neither torch nor trl: validation reads it."""

from dataclasses import dataclass

from omegaconf import DictConfig

from rlhf.errors import UserError
from rlhf.runs import is_main_process
from rlhf.settings import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, UNIT, WHOLE_SOFTMAX, Rule, SamplingSettings, is_int


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
    kl_ramp: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    eval_prompts: int = 128
    logging_steps: int = 1
    save_steps: int = 10
    save_total_limit: int = 1


# The values each key accepts (rlhf/validate.py checks them with every other node's; STAGE_RULES add to them).
PPO_RULES = {
    **dict.fromkeys(("batch_size", "mini_batch_size", "ppo_epochs", "total_updates", "max_new_tokens"), AT_LEAST_ONE),
    **dict.fromkeys(("logging_steps", "save_total_limit"), AT_LEAST_ONE),
    "max_prompt_length": AT_LEAST_ONE,  # prompts are cut to it: there is no "no limit"
    **dict.fromkeys(("cliprange", "cliprange_value", "temperature", "horizon", "target"), POSITIVE),
    **dict.fromkeys(("kl_coef", "vf_coef"), NON_NEGATIVE),
    **dict.fromkeys(("gamma", "lam", "kl_ramp"), UNIT),
    "top_p": WHOLE_SOFTMAX,
    "save_steps": Rule(lambda v: v >= 0, "an integer >= 0 (0 = no checkpoints)", integer=True),
    "max_grad_norm": POSITIVE,  # PPO clips to it every step: 0 would zero every gradient
}


def check_ppo_batch(ppo) -> None:
    """PPO's batch splits into its mini-batches and holds the 2 answers whitening needs."""
    if isinstance(ppo, DictConfig) and is_int(ppo.get("batch_size")) and is_int(ppo.get("mini_batch_size")):
        if ppo.batch_size % ppo.mini_batch_size:
            raise UserError(f"ppo.batch_size={ppo.batch_size}: must be a multiple of ppo.mini_batch_size={ppo.mini_batch_size}")
    if isinstance(ppo, DictConfig) and is_int(ppo.get("batch_size")) and ppo.batch_size < 2:
        # Whitening estimates a variance: over one answer's tokens (one token, if it is an immediate
        # EOS) it fails mid-run; over one score, always.
        scores = " and, with ppo.whiten_scores=true, its scores" if ppo.get("whiten_scores") is True else ""
        raise UserError(
            f"ppo.batch_size={ppo.batch_size}: PPO whitens each update's advantages{scores} over the batch, which needs at least 2 answers"
        )


MIN_REACH = 2.0  # an adaptive controller that cannot at least double or halve kl_coef over the run steers nothing


def say_if_the_kl_controller_cannot_move(controller, settings) -> None:
    """One line at the start when the adaptive KL controller cannot reach its target within the
    run: Ziegler et al.'s horizon (10000 samples) at a batch of 8 moves kl_coef by under 2% over
    100 updates, so the KL ends where kl_coef puts it, not at ppo.target."""
    if not settings.adaptive_kl:  # a fixed kl_coef moves by design
        return
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
