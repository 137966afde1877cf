"""Export a run's trained model as one standalone model: `python -m rlhf.export RUN_DIR OUT_DIR`.

The whole lineage (base model, every earlier run's adapter, the run's own adapter) is merged
into full-precision (float32) safetensors weights and written with the tokenizer (chat template
included) and the generation config, so plain transformers - or vLLM, TGI, the hub - loads
exactly the trained model, no peft and no project code needed:

- a policy (sft, dpo, ppo, grpo, rloo runs: `making(POLICY)`): a causal LM (PPO's value head stays behind: it only trains);
- a reward model (rm runs): a one-output sequence classifier with its score head;
- a 4-/8-bit run: the base was trained quantized, so the export merges the adapter into the
  dequantized base - the weights the adapter was trained against - not into the original
  full-precision base, which would be a different model.

`--adapter` writes the run's LoRA adapter over a base that plain peft loads instead (the hub id
or a local directory); for a run that stands on earlier adapters, those are folded into one
adapter of their summed rank (`rank(ΔW1 + ΔW2) <= r1 + r2`, so the sum is exact).

Every export is checked on the way out: loaded back with the plain libraries, its logits (a
reward model's scores) on sample inputs must equal the trained model's, as the project loads
it, within `--tolerance` x (1 + the largest |logit| at that position) (default 1e-5: the
precision float32 weights carry through a deep model), or the export fails and nothing is
left at OUT_DIR.
"""

import argparse
import copy
import json
import shutil
from pathlib import Path

from rlhf.errors import UserError, exit_on_user_error
from rlhf.lineage import FULL_PRECISION, Lineage, TrainedRun  # export and check in float32, on the CPU
from rlhf.registry import POLICY, REWARD_MODEL, making

EXPORTABLE_STAGES = (*making(POLICY), *making(REWARD_MODEL))
SAMPLE_CONVERSATIONS = [  # inputs of the check: a short and a longer chat, padded into one batch
    [{"role": "user", "content": "1+1等于几？"}],
    [
        {"role": "user", "content": "Write one polite sentence about the weather."},
        {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "请再说一句。"},
    ],
]


def export(run_dir, out_dir, adapter_only: bool = False, tolerance: float = 1e-5) -> dict:
    """Write the run's model to `out_dir`, check it, and return what rlhf_export.json records."""
    run = TrainedRun.of(run_dir, "RUN_DIR", stages=EXPORTABLE_STAGES)
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"OUT_DIR {out} exists and is not empty; choose a new directory")
    head = run.head
    tokenizer = run.start.tokenizer()
    trained, gap = full_precision_form(run, head, tokenizer)
    try:
        base = write_adapter(run, out, head) if adapter_only else write_merged(trained, out, tokenizer)
        tokenizer.save_pretrained(out)
        # In float64 the check sees the exported weights (rounded once to float32), not the rounding
        # of float32 matmuls, which alone moves the tiny model's logits by ~1e-5 between the merged
        # and the unmerged form of the same weights.
        differences = [gap, largest_difference(trained.double(), load_back(out, head, base).double(), tokenizer)]
        difference, scaled = (max(d[i] for d in differences) for i in (0, 1))
        if not scaled <= tolerance:
            raise UserError(
                f"export check failed: the exported model's {'scores' if head == 'reward' else 'logits'} differ from the "
                f"trained model's by up to {difference:.3g}, {scaled:.3g} relative to 1 + the largest |logit| (tolerance {tolerance:g}); "
                "nothing was exported"
            )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    record = {
        "run": str(run.final.parent),
        "stage": run.cfg.stage,
        "form": "adapter" if adapter_only else "merged",
        "base": base,
        "max_abs_difference": difference,
        "max_difference_relative_to_1_plus_largest_abs_logit": scaled,
        "tolerance": tolerance,
    }
    (out / "rlhf_export.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def full_precision_form(run, head: str, tokenizer) -> tuple:
    """(the trained model with float32 weights, the largest difference of its outputs from the
    model as the project loads it). A quantized run's start is dequantized: its float32 forward
    must match the quantized one (bitsandbytes computes with the dequantized weights). Earlier
    runs' adapters stay stacked beside the dequantized base, as they were beside the quantized one."""
    from peft import PeftModel

    from rlhf.models import stack_adapters

    trained = run.load(FULL_PRECISION, run.cfg.get("quantization"), head=head).eval()
    if run.cfg.get("quantization") is None:
        return trained, (0.0, 0.0)
    start = Lineage(run.start.base).load(FULL_PRECISION, run.cfg.quantization, head=head).dequantize()
    stack_adapters(start, run.start.adapters, head=head)  # dequantizing replaced the layers they were on
    expanded = PeftModel.from_pretrained(start, str(run.adapter)).eval()
    return expanded, largest_difference(trained, expanded, tokenizer)


def write_merged(trained, out: Path, tokenizer) -> None:
    """The trained model with its adapter folded in (in float64, rounded once to float32); its
    configs name the tokenizer's pad id (a reward model reads its score at the last token that
    is not the pad id, so plain transformers must know the one the tokenizer pads with). Earlier
    runs' stacked updates are folded in too."""
    from peft import PeftModel

    from rlhf.models import fold_stacked_updates

    model = copy.deepcopy(trained).double()
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    fold_stacked_updates(model)
    model = model.float()
    for settings in (model.config, getattr(model, "generation_config", None)):
        if settings is not None:
            settings.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


def write_adapter(run, out: Path, head: str) -> str:
    """The run's adapter - with the adapters it stands on folded in - over the lineage's base;
    returns the base's name as adapter_config.json gives it."""
    from peft import PeftModel

    if run.adapter is None:
        raise UserError(f"--adapter: {run.final} holds a whole model (trained with peft=none), not an adapter; export it without --adapter")
    if run.cfg.get("quantization") is not None:
        raise UserError(
            "--adapter: this run trained its adapter on quantized weights, so no adapter over the full-precision base "
            "reproduces it; export it without --adapter (merged into the dequantized base)"
        )
    if head == "reward" and run.start.adapters:  # peft cannot stack a policy's adapter under a classifier's
        raise UserError(
            "--adapter: this reward model stands on earlier runs' adapters, which have no single-adapter form over a "
            "classifier; export it without --adapter (merged weights)"
        )
    base_lineage = Lineage(run.start.base)
    base_name, revision = base_lineage.loadable_base()
    adapters = [*run.start.adapters, run.adapter]
    names = ["default"] if len(adapters) == 1 else [f"stage{i}" for i in range(len(adapters))]
    model = PeftModel.from_pretrained(base_lineage.load(FULL_PRECISION, head=head), str(adapters[0]), adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:]):
        model.load_adapter(str(adapter), adapter_name=name)
    if len(names) > 1:  # one adapter of the summed rank: exactly the sum of the updates
        model.add_weighted_adapter(names, [1.0] * len(names), "default", combination_type="cat")
        for name in names:
            model.delete_adapter(name)
    model.save_pretrained(out, selected_adapters=["default"])
    settings = json.loads((out / "adapter_config.json").read_text())
    settings.update(base_model_name_or_path=base_name, revision=revision)
    (out / "adapter_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return base_name


def load_back(out: Path, head: str, adapter_base):
    """The export as a user loads it: plain transformers, or peft over the named base."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if adapter_base is not None:
        from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

        auto = AutoPeftModelForSequenceClassification if head == "reward" else AutoPeftModelForCausalLM
    else:
        auto = AutoModelForSequenceClassification if head == "reward" else AutoModelForCausalLM
    # A reward model's adapter sits over a causal LM's config: the classifier has one output.
    model = auto.from_pretrained(str(out), dtype=torch.float32, **({"num_labels": 1} if head == "reward" else {})).eval()
    if head == "reward" and model.config.pad_token_id is None:
        # An adapter over a base whose config names no pad id (Qwen2.5, Qwen3): the classifier needs
        # the tokenizer's to find each row's last token - the line a user of the export adds too.
        from transformers import AutoTokenizer

        model.config.pad_token_id = AutoTokenizer.from_pretrained(str(out)).pad_token_id
    return model


def largest_difference(trained, exported, tokenizer) -> tuple:
    """(max |trained - exported|, the same relative to 1 + the position's largest |logit|) over
    the logits (scores) of a padded batch of sample chats. The second is what the check bounds:
    float32 weights carry about 7 significant digits, so through a 30-layer model whose logits
    reach 20 or more, rounding alone moves them by ~1e-5."""
    import torch

    texts = [
        tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=chat[-1]["role"] == "user")
        for chat in SAMPLE_CONVERSATIONS
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        expected, got = trained(**batch).logits.float(), exported(**batch).logits.float()
    if expected.dim() == 3:  # a policy: compare the real tokens only
        mask = batch["attention_mask"].bool()
        expected, got = expected[mask], got[mask]
    gap = (expected - got).abs()
    scale = 1 + expected.abs().amax(dim=-1, keepdim=True)  # per position (per row for a reward model's one score)
    return gap.max().item(), (gap / scale).max().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help=f"a finished run directory of stage {', '.join(EXPORTABLE_STAGES)}")
    parser.add_argument("out_dir", help="where to write the standalone model (new or empty)")
    parser.add_argument("--adapter", action="store_true", help="write one LoRA adapter over a loadable base instead of merged weights")
    parser.add_argument(
        "--tolerance", type=float, default=1e-5, help="largest |logit difference| / (1 + largest |logit|) the check accepts (default 1e-5)"
    )
    args = parser.parse_args(argv)
    with exit_on_user_error():
        record = export(args.run_dir, args.out_dir, adapter_only=args.adapter, tolerance=args.tolerance)
    print(
        f"exported {args.run_dir} -> {args.out_dir} (checked: largest logit difference {record['max_abs_difference']:.3g}, "
        f"{record['max_difference_relative_to_1_plus_largest_abs_logit']:.3g} relative to 1 + the largest |logit|)"
    )


if __name__ == "__main__":
    main()
