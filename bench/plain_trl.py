"""The same training as `train.py stage=<sft|dpo>` written by hand with TRL alone, with TRL's
defaults for everything a user would not set: the peer the framework is measured against
(bench/run.py).

    python bench/plain_trl.py --stage dpo --model DIR --data FILE --steps 30 --out result.json
"""

import argparse
import json

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", choices=["sft", "dpo"], required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, default=16, help="rows per step")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--rows", type=int, default=None, help="read only the first N rows (default: all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    data = rows(args.data)[: args.rows]
    if args.stage == "sft":
        records = [
            {
                "prompt": [{"role": "user", "content": r["instruction"] + (f"\n{r['input']}" if r["input"].strip() else "")}],
                "completion": [{"role": "assistant", "content": r["output"]}],
            }
            for r in data
        ]
    else:
        records = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in data
        ]
    # What a user of plain TRL writes: the run's sizes, no tracker, and use_cpu on a machine without
    # a GPU (TRL's bf16 default refuses to start there otherwise); TRL's defaults for the rest,
    # precision included (bf16=True: bfloat16 autocast on the CPU) and activation checkpointing.
    common = dict(
        output_dir="/tmp/plain-trl-bench",
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        max_length=256,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    dataset = Dataset.from_list(records)
    if args.stage == "sft":
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(learning_rate=2e-3, completion_only_loss=True, **common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    else:
        trainer = DPOTrainer(
            model=model,
            args=DPOConfig(learning_rate=5e-4, beta=0.1, **common),  # TRL runs the reference on every batch
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora,
        )
    result = trainer.train()
    with open(args.out, "w") as f:
        json.dump({"train_runtime": result.metrics["train_runtime"], "bf16": trainer.args.bf16}, f)


if __name__ == "__main__":
    main()
