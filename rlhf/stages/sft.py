"""Supervised fine-tuning: teach the model to answer like the data, with TRL's SFTTrainer.

Rows become prompt/completion conversations; the trainer applies the chat template and
(`sft.completion_only_loss`) counts only the answer tokens in the loss.
"""

from pathlib import Path

from hydra.utils import instantiate
from trl import SFTTrainer

from rlhf.data import load_splits
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.training import HistoryWriter, fit, start_tracking, training_args


def run(cfg, run_dir: Path) -> dict:
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    train_data, eval_data = load_splits(cfg.dataset, kind="sft")
    model = load_causal_lm(model_path, cfg.model, cfg.quantization, cfg.hardware)

    start_tracking(cfg, run_dir)
    trainer = SFTTrainer(
        model=model,
        args=training_args(cfg, cfg.sft, run_dir, has_eval=eval_data is not None),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=instantiate(cfg.peft) if cfg.peft is not None else None,
        callbacks=[HistoryWriter(run_dir / "history.jsonl")],
    )
    return fit(trainer, run_dir)
