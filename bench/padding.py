"""How much of each training batch is padding? The share of pad positions in the batches the
framework's trainers actually build, for SFT, RM and DPO, on real data.

    python bench/padding.py                                   # SmolLM2 on BELLE (SFT) and HH-RLHF (RM, DPO)
    python bench/padding.py --batches 4 --model tiny          # quick, on the built-in data

Builds each stage's trainer exactly as `train.py` does (rlhf.lifecycle.trainer_kwargs on the
composed config) and walks its first --batches training batches without training: pad share =
1 - (real tokens) / (batch rows x padded length), per batch, then over all of them. A DPO batch
holds the chosen and the rejected answers of its pairs, padded to one length. Writes
bench/results/<date>-padding-<model>.json and .md.
"""

import argparse
import os
import sys
import time

from common import ROOT, machine, write_results  # noqa: E402  (bench/ is the script's own folder)

sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
REAL = {
    "sft": ["dataset=belle", f"dataset.path={DATA / 'sft_zh/belle/dev1K.json'}"],
    "rm": ["dataset=hh_rlhf", f"dataset.path={DATA / 'preference/hh-rlhf/helpful-base/test.jsonl.gz'}", "dataset.skip_invalid=true"],
    "dpo": ["dataset=hh_rlhf", f"dataset.path={DATA / 'preference/hh-rlhf/helpful-base/test.jsonl.gz'}", "dataset.skip_invalid=true"],
}
TRAINERS = {"sft": "trl.SFTTrainer", "rm": "rlhf.reward_trainer.RankingRewardTrainer", "dpo": "rlhf.dpo_trainer.KLDPOTrainer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option")
    parser.add_argument("--batches", type=int, default=16, help="training batches walked per stage")
    parser.add_argument("--batch-size", type=int, default=4, help="rows (DPO: pairs) per batch")
    parser.add_argument("--max-length", type=int, default=256, help="tokens per row at most")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "model": args.model, "batch_size": args.batch_size}
    result["max_length"], result["stages"] = args.max_length, {}
    for stage in ("sft", "rm", "dpo"):
        data = REAL[stage] if args.model != "tiny" else []
        result["stages"][stage] = pad_share(stage, args, data)
    write_results(args.out, f"{result['date'][:10]}-padding-{args.model}", result, markdown(result))


def pad_share(stage: str, args, data: list) -> dict:
    """Pad share of the first batches of `stage`'s trainer, built as train.py builds it."""
    import statistics
    import tempfile

    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_class

    from rlhf.compose import compose
    from rlhf.context import RunContext
    from rlhf.lifecycle import load_inputs, trainer_kwargs

    rows = 4 * args.batches * args.batch_size
    overrides = [f"model={args.model}", f"stage={stage}", *data, f"dataset.max_samples={rows}", "dataset.test_size=0"]
    overrides += [f"{stage}.per_device_train_batch_size={args.batch_size}", f"{stage}.max_length={args.max_length}"]
    overrides += ["dpo.ref_cache=false"] if stage == "dpo" else []  # no reference pass: only the batches are wanted
    cfg = compose(overrides)
    HydraConfig.instance().set_config(cfg)  # the run name reads Hydra's job settings
    with tempfile.TemporaryDirectory() as run_dir:
        context = RunContext.open(cfg, run_dir)
        inputs = load_inputs(context, data_kind="sft" if stage == "sft" else "preference", head="reward" if stage == "rm" else "causal_lm")
        trainer = get_class(TRAINERS[stage])(**trainer_kwargs(context, cfg[stage], inputs, evaluate=False))
        shares, real, total = [], 0, 0
        for index, batch in enumerate(trainer.get_train_dataloader()):
            if index == args.batches:
                break
            mask = batch["attention_mask"]
            shares.append(1 - mask.sum().item() / mask.numel())
            real, total = real + mask.sum().item(), total + mask.numel()
    return {
        "batches": len(shares),
        "pad_share": 1 - real / total,
        "min": min(shares),
        "median": statistics.median(shares),
        "max": max(shares),
    }


def markdown(r: dict) -> str:
    lines = [
        f"Measured {r['date']} on {r['machine']}; model `{r['model']}`, batches of {r['batch_size']} rows (DPO: pairs) "
        f"at max_length {r['max_length']}, the trainers' own batches in their own order.",
        "",
        "| stage | batches | pad share (all tokens) | per batch: min / median / max |",
        "|---|---|---|---|",
    ]
    for stage, s in r["stages"].items():
        lines.append(f"| {stage.upper()} | {s['batches']} | {s['pad_share']:.1%} | {s['min']:.1%} / {s['median']:.1%} / {s['max']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
