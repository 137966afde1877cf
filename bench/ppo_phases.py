"""PPO's time against the bare operations it is made of, batch by batch.

    python bench/ppo_phases.py --sft RUN --rm RUN [--updates 3] [--set ppo.KEY=VALUE ...]

Builds PPO as `train.py stage=ppo` does (SmolLM2 on HH-RLHF from ../shared/data by default, the
sizes of bench/learning.py's PPO) and runs --updates updates. Each update's prompts are then
put through the bare operations in the same process:
- generation: `model.generate` of a plain transformers model holding the starting policy (its
  lineage loaded as-is, no adapter wrapper, no value head), on the same encoded prompts, for as
  many decoding steps as the rollout took (min_new_tokens = max_new_tokens = its width), with the
  same sampler (temperature, no top-k);
- optimisation: forward and backward passes of the PPO policy (adapter trainable) over the same
  sequences in the same mini-batches and epochs, with no loss but the mean logit, no optimizer.
Both sides are warmed up first (one untimed sampling each). The ratios (PPO / bare) per update, their mean and range go to
bench/results/<date>-ppo-phases.json and .md, with the machine and precision.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, cpu_flags, machine, write_results  # noqa: E402  (bench/ is the script's own folder)

sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "preference" / "hh-rlhf" / "helpful-base" / "test.jsonl.gz"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft", required=True, type=Path, help="a finished stage=sft run: the starting policy")
    parser.add_argument("--rm", required=True, type=Path, help="a finished stage=rm run: the reward model")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48, help="ppo.max_new_tokens (bench/learning.py's)")
    parser.add_argument("--prompt-length", type=int, default=256, help="ppo.max_prompt_length (bench/learning.py's)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default=str(DATA), help="HH-RLHF-format file; '' = the stage's default dataset")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another override (repeatable)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    overrides = [
        f"model={args.model}",
        "stage=ppo",
        *(["dataset=hh_rlhf", f"dataset.path={args.data}", "dataset.max_samples=560", "dataset.skip_invalid=true"] if args.data else []),
        f"model.init_from={args.sft.resolve()}",
        f"ppo.reward_model={args.rm.resolve()}",
        f"ppo.total_updates={args.updates}",
        "ppo.save_steps=0",
        f"ppo.max_new_tokens={args.new_tokens}",
        f"ppo.max_prompt_length={args.prompt_length}",
        *args.set,
    ]
    result = measure(overrides)
    result.update(date=time.strftime("%Y-%m-%d"), machine=machine(), cpu_flags=cpu_flags(), overrides=overrides)
    write_results(args.out, f"{result['date']}-ppo-phases-{args.model}", result, markdown(result))


def measure(overrides: list) -> dict:
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from transformers import set_seed

    from rlhf.compose import compose
    from rlhf.context import RunContext
    from rlhf.lifecycle import load_prompt_inputs
    from rlhf.lineage import Lineage
    from rlhf.ppo.trainer import PPOTrainer
    from rlhf.stages.ppo import ppo_models

    cfg = compose(overrides)
    HydraConfig.instance().set_config(cfg)  # the run name reads Hydra's job settings
    context = RunContext.open(cfg, run_dir=tempfile.gettempdir())  # nothing is written there: the updates checkpoint below
    settings, device = instantiate(cfg.ppo), context.device
    set_seed(cfg.seed)
    inputs, _ = load_prompt_inputs(context, settings.max_prompt_length)  # the prompts stage=ppo samples from
    models = ppo_models(context, inputs)
    trainer = PPOTrainer(models, settings, device, log=lambda record: None)
    prompts = [row["prompt"] for row in inputs.data.train]
    plain = Lineage.of(cfg.model).load(cfg.hardware).to(device).eval()  # the starting policy as plain transformers
    with context.autocast():  # warm-up, untimed: the first calls of a process pay for allocation and thread start-up
        warm_up = trainer.sample(prompts[: settings.batch_size])
        bare_generate(plain, inputs.tokenizer, prompts[: settings.batch_size], warm_up.responses.shape[1], settings, device)
    rollouts, phases = record_phases(trainer)
    with tempfile.TemporaryDirectory() as checkpoints, context.autocast():
        trainer.train(prompts, seed=cfg.seed, checkpoints=Path(checkpoints), keep={})
    updates = []
    with context.autocast():
        for (batch, rollout), seconds in zip(rollouts, phases):
            bare_generation = bare_generate(plain, inputs.tokenizer, batch, rollout.samples.responses.shape[1], settings, device)
            bare_optimisation = bare_forward_backward(models.policy, rollout, settings)
            updates.append(
                {
                    "generation_seconds": seconds["generation"],
                    "bare_generation_seconds": bare_generation,
                    "decoding_steps": rollout.samples.responses.shape[1],
                    "generated_tokens": int(rollout.samples.response_mask.sum()),
                    "optimisation_seconds": seconds["optimisation"],
                    "bare_forward_backward_seconds": bare_optimisation,
                    "other_rollout_seconds": seconds["rollout"] - seconds["generation"],
                }
            )
    ratios = {
        "generation": [u["generation_seconds"] / u["bare_generation_seconds"] for u in updates],
        "optimisation": [u["optimisation_seconds"] / u["bare_forward_backward_seconds"] for u in updates],
    }
    return {
        "model": str(cfg.model.name_or_path),
        "precision": f"{cfg.hardware.dtype} weights" + (", bfloat16 autocast" if cfg.hardware.training_args.bf16 else ""),
        "torch_threads": torch.get_num_threads(),
        "batch_size": settings.batch_size,
        "mini_batch_size": settings.mini_batch_size,
        "ppo_epochs": settings.ppo_epochs,
        "max_new_tokens": settings.max_new_tokens,
        "updates": updates,
        "ppo_phase_ratios": {phase: statistics.mean(values) for phase, values in ratios.items()},
        "ppo_phase_ratio_range": {phase: [min(values), max(values)] for phase, values in ratios.items()},
    }


def record_phases(trainer) -> tuple:
    """Wrap the trainer's rollout and optimisation so that each update's prompts, rollout and
    phase times are kept: ([(prompts, rollout)], [{"rollout": s, "generation": s, "optimisation": s}])."""
    rollouts, phases = [], []
    rollout, optimise = trainer.rollout, trainer.optimise

    def timed_rollout(prompts):
        generation_before, start = trainer.seconds.get("generation", 0.0), time.perf_counter()
        result = rollout(prompts)
        phases.append({"rollout": time.perf_counter() - start, "generation": trainer.seconds["generation"] - generation_before})
        rollouts.append((prompts, result))
        return result

    def timed_optimise(*args, **kwargs):
        start = time.perf_counter()
        result = optimise(*args, **kwargs)
        phases[-1]["optimisation"] = time.perf_counter() - start
        return result

    trainer.rollout, trainer.optimise = timed_rollout, timed_optimise
    return rollouts, phases


def bare_generate(model, tokenizer, prompts, steps: int, settings, device) -> float:
    """Seconds of one plain `generate` of the prompts for `steps` decoding steps."""
    import torch

    from rlhf.generation import encode_prompts

    encoded = encode_prompts(tokenizer, prompts, settings.max_prompt_length, device)
    options = {"do_sample": True, "temperature": settings.temperature, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}
    ids = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(**encoded, max_new_tokens=steps, min_new_tokens=steps, **options, **ids)
        return time.perf_counter() - start


def bare_forward_backward(policy, rollout, settings) -> float:
    """Seconds of forward + backward over the rollout's sequences in PPO's mini-batches and epochs."""
    import torch

    samples = rollout.samples
    start = time.perf_counter()
    for _ in range(settings.ppo_epochs):
        for index in torch.randperm(settings.batch_size).split(settings.mini_batch_size):
            part = samples.select(index)
            logits = policy(input_ids=part.sequences, attention_mask=part.attention_mask).logits
            logits.float().mean().backward()
    policy.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def markdown(r: dict) -> str:
    lines = [
        f"PPO phases against bare operations ({r['date']}; {r['machine']}; CPU flags {r['cpu_flags']}; {r['precision']}; "
        f"{r['torch_threads']} threads). Batch {r['batch_size']}, mini-batch {r['mini_batch_size']}, {r['ppo_epochs']} epochs, "
        f"up to {r['max_new_tokens']} new tokens.",
        "",
        "| update | generation s (bare) | steps, tokens | optimisation s (bare fwd+bwd) | rest of rollout s |",
        "|---|---|---|---|---|",
    ]
    for n, u in enumerate(r["updates"], 1):
        lines.append(
            f"| {n} | {u['generation_seconds']:.1f} ({u['bare_generation_seconds']:.1f}) | "
            f"{u['decoding_steps']}, {u['generated_tokens']} | "
            f"{u['optimisation_seconds']:.1f} ({u['bare_forward_backward_seconds']:.1f}) | {u['other_rollout_seconds']:.1f} |"
        )
    for phase, target in (("generation", 1.3), ("optimisation", 1.5)):
        low, high = r["ppo_phase_ratio_range"][phase]
        lines.append(f"\n{phase}: PPO / bare {r['ppo_phase_ratios'][phase]:.2f} (range {low:.2f}-{high:.2f}; target <= {target})")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
