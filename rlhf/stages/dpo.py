"""Direct Preference Optimization (Rafailov et al. 2023) with TRL's DPOTrainer.

The loss pushes up the policy's log-ratio to the reference on chosen answers against rejected
ones: -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]).
Under LoRA the reference is the same network with its adapter disabled (no second copy in
memory); with `peft=none` TRL keeps a frozen copy of the starting weights.
"""

from pathlib import Path

from hydra.utils import instantiate
from trl import DPOTrainer

from rlhf.data import load_splits
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path
from rlhf.training import HistoryWriter, fit, start_tracking, training_args


def run(cfg, run_dir: Path) -> dict:
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    train_data, eval_data = load_splits(cfg.dataset, kind="preference")
    model = load_causal_lm(model_path, cfg.model, cfg.quantization, cfg.hardware)

    start_tracking(cfg, run_dir)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # LoRA: adapter disabled; full fine-tuning: TRL copies the start model
        args=training_args(cfg, cfg.dpo, run_dir, has_eval=eval_data is not None),
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=instantiate(cfg.peft) if cfg.peft is not None else None,
        callbacks=[HistoryWriter(run_dir / "history.jsonl")],
    )
    return fit(trainer, run_dir)
