"""Try a run's policy: `python -m rlhf.sample RUN_DIR "prompt" ["prompt" ...]`.

Loads the policy exactly as the run trained it (its whole lineage: base model, earlier runs'
adapters, its own adapter), wraps each prompt in the model's chat template and prints the
answer. Without prompts it reads one prompt per line from standard input (an interactive
session in a terminal; end with Ctrl-D). Decoding is greedy unless --temperature is above 0.
"""

import argparse
import sys

from omegaconf import OmegaConf

from rlhf.errors import exit_on_user_error
from rlhf.registry import POLICY, making


def load_policy(run_dir):
    """(policy, tokenizer, device) of the sft, dpo or ppo run at `run_dir`: on a GPU in the run's
    dtype when there is one, else float32 on the CPU."""
    import torch

    from rlhf.lineage import POLICY_STAGES, TrainedRun

    run = TrainedRun.of(run_dir, "RUN_DIR", stages=POLICY_STAGES)
    on_gpu = torch.cuda.is_available()
    hardware = OmegaConf.create({"dtype": run.cfg.hardware.dtype if on_gpu else "float32"})
    device = torch.device("cuda" if on_gpu else "cpu")
    policy = run.load(hardware, run.cfg.get("quantization") if on_gpu else None, merge=True)
    return policy.to(device).eval(), run.start.tokenizer(), device


def answer(policy, tokenizer, device, prompts: list, settings) -> list:
    from rlhf.generation import fit_prompts, sample

    # A message over the limit keeps its end, and the template its header
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    messages, _ = fit_prompts(conversations, tokenizer, settings.max_prompt_length, "the prompt limit")
    return sample(policy, tokenizer, messages, settings, device).texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf.sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help=f"a finished run directory of stage {', '.join(making(POLICY))}")
    parser.add_argument("prompts", nargs="*", help="user messages; none: read one per line from standard input")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); above 0 samples")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    args = parser.parse_args(argv)
    from rlhf.settings import SamplingSettings

    settings = SamplingSettings(max_prompt_length=1024, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    with exit_on_user_error():
        policy, tokenizer, device = load_policy(args.run_dir)
    if args.prompts:
        for prompt, text in zip(args.prompts, answer(policy, tokenizer, device, args.prompts, settings)):
            print(text if len(args.prompts) == 1 else f"> {prompt}\n{text}\n")
        return
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        if line.strip():
            print(answer(policy, tokenizer, device, [line.strip()], settings)[0], flush=True)


if __name__ == "__main__":
    main()
