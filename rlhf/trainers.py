"""The project's additions to TRL's trainers, kept small and on top of TRL's own loss code:

- every evaluation of a preference model (DPO policy or reward model) also reports
  win_rate and kendall_tau over the held-out pairs (`rlhf.metrics`);
- DPO takes an explicit KL penalty, `dpo.kl_coef` times the mean per-token
  KL(policy || reference) over the chosen responses' tokens;
- DPO's reference log-probs are cached on disk across runs (`dpo.ref_cache`).
"""

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from trl import DPOConfig, DPOTrainer, RewardTrainer

from rlhf import distributed
from rlhf.cache import cache_dir
from rlhf.compat import ReferenceLogpsHook, log_metric, prepare_inputs
from rlhf.generation import as_reference
from rlhf.metrics import preference_metrics
from rlhf.training import float32_adapter_sums


class PreferenceEvaluation:
    """Mixin for trainers whose batches are [chosen rows; rejected rows]: after the library's
    own evaluation, score every held-out pair once more and add the preference metrics."""

    def pair_scores(self, model, batch) -> tuple:
        """(chosen scores, rejected scores) of one collated batch."""
        raise NotImplementedError

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        model = self.accelerator.unwrap_model(self.model)
        chosen, rejected = [], []
        with torch.no_grad():
            for batch in dataloader:
                scores = self.pair_scores(model, prepare_inputs(self, batch))
                # Under DDP each rank scores its shard: gather them, in dataset order.
                batch_chosen, batch_rejected = self.accelerator.gather_for_metrics(scores)
                chosen += batch_chosen.float().tolist()
                rejected += batch_rejected.float().tolist()
        for name, value in preference_metrics(chosen, rejected, self._prompt_keys(len(chosen))).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    def _prompt_keys(self, count: int) -> list:
        """One key per evaluated pair, equal for pairs of the same prompt (the eval loader keeps
        the dataset's order); without prompts each pair stands alone."""
        dataset = self.eval_dataset
        if hasattr(dataset, "column_names") and "prompt" in dataset.column_names and len(dataset) == count:
            return [json.dumps(prompt, ensure_ascii=False, sort_keys=True) for prompt in dataset["prompt"]]
        return list(range(count))


class RankingRewardTrainer(PreferenceEvaluation, RewardTrainer):
    """TRL's RewardTrainer; each pair's scores are the reward model's outputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # With quantized weights TRL turns every trainable weight into bf16 (QLoRA's recipe).
        # The score head, unlike LoRA's layers, does not cast its input: keep it in the dtype
        # of the hidden states it reads.
        if getattr(self.model, "is_loaded_in_4bit", False) or getattr(self.model, "is_loaded_in_8bit", False):
            hidden_dtype = self.model.get_input_embeddings().weight.dtype
            for name, param in self.model.named_parameters():
                if param.requires_grad and "lora_" not in name:
                    param.data = param.data.to(hidden_dtype)

    def pair_scores(self, model, batch):
        scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits[:, 0]
        return scores.chunk(2)


@dataclass
class KLDPOConfig(DPOConfig):
    """trl.DPOConfig plus the explicit KL penalty of the reference design and the reference
    log-prob cache."""

    kl_coef: float = field(
        default=0.0,
        metadata={"help": "Weight of the mean per-token KL(policy || reference) on chosen responses (0 = plain DPO)."},
    )
    ref_cache: bool = field(
        default=True,
        metadata={"help": "Compute reference log-probs once and keep them on disk for later runs (frozen references only)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.sync_ref_model or self.kl_coef > 0:
            # A moving reference cannot be cached; and the KL term runs the reference on every
            # batch anyway (it needs its full distributions, not log-probs of the answers).
            self.ref_cache = False
        if self.ref_cache:  # the cache stores what TRL's precomputation produces
            self.precompute_ref_log_probs = True


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def read_ref_cache(path, rows: int):
    """The cached reference log-probs at `path`, or None (said in one line) when the file is
    unreadable or does not hold one value per row: the run computes them anew and replaces it."""
    try:
        cached = load_file(str(path))
        if all(column in cached and cached[column].shape == (rows,) for column in REF_COLUMNS):
            return cached
        problem = f"it does not hold {rows} values per column"
    except Exception as err:  # a truncated or foreign file: safetensors raises its own error types
        problem = f"unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    print(f"reference log-probs cache {path}: {problem}; computing them anew", flush=True)
    return None


class KLDPOTrainer(PreferenceEvaluation, ReferenceLogpsHook, DPOTrainer):
    """TRL's DPOTrainer; with kl_coef > 0 the loss becomes

        L = L_DPO + kl_coef * mean_t KL(pi(.|x, y_<t) || ref(.|x, y_<t))

    over the non-padding tokens t of the chosen responses y. The KL is exact over the vocabulary
    at each position (not a single-token estimate: the chosen tokens are not samples of the
    policy). Both parts are logged as `dpo_loss` and `kl_loss`. With kl_coef = 0 the loss is
    TRL's, untouched."""

    def __init__(self, *args, reference_identity: str = "", **kwargs):
        self.reference_identity = reference_identity  # what the reference model is, for the cache key
        self.timings = {}  # seconds computing or loading the reference log-probs, when precomputed (fit() reports it)
        super().__init__(*args, **kwargs)

    def reference_logps(self, dataset, name, batch_size):
        """TRL's precomputation of reference log-probs, kept on disk across runs: a beta sweep
        computes them once. The key covers the reference model (base, merged adapters, dtype,
        quantization), the tokenizer, the tokenized rows, and the truncation settings, so any
        change there computes them anew."""
        start = time.perf_counter()
        float32_adapter_sums(self.model, self.args.bf16)  # TRL runs this pass while the trainer is built, before fit()
        dataset = self._cached_ref_logps(dataset, name, batch_size)
        self.timings["time/reference_logps"] = self.timings.get("time/reference_logps", 0.0) + time.perf_counter() - start
        return dataset

    def _cached_ref_logps(self, dataset, name, batch_size):
        path = self.ref_cache_path(dataset) if self.args.ref_cache and self.reference_identity else None
        main = self.accelerator.is_main_process
        cached = read_ref_cache(path, len(dataset)) if main and path is not None and path.is_file() else None
        # Rank 0 decides, and hands every rank its values: TRL's precompute below is collective, so
        # ranks that decided alone (a file written between their checks, a node-local cache) would
        # enter it alone and wait forever.
        cached = distributed.from_main_process(cached)
        if cached is not None:
            print(f"reference log-probs of the {name} split: loaded from {path}", flush=True)
            for column in REF_COLUMNS:
                dataset = dataset.add_column(column, cached[column].tolist())
            return dataset
        dataset = self.trl_reference_logps(dataset, name, batch_size)
        if path is not None and main:
            columns = {c: torch.tensor(list(dataset[c]), dtype=torch.float32) for c in REF_COLUMNS}
            path.parent.mkdir(parents=True, exist_ok=True)
            # A name of its own per writer: concurrent sweep jobs writing the same key each rename
            # a whole file into place, and the last one wins.
            handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            os.close(handle)
            save_file(columns, tmp)
            os.replace(tmp, path)  # whole or not at all
        return dataset

    def ref_cache_path(self, dataset):
        rows = hashlib.sha256()
        for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
            rows.update(json.dumps(list(dataset[column])).encode())
        tokenizer = self.processing_class
        key = json.dumps(
            {
                "reference": self.reference_identity,
                "tokenizer": [tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template],
                "rows": rows.hexdigest(),
                "truncation": [self.args.max_length, self.args.truncation_mode, self.args.pad_to_multiple_of],
                "loss": [self.args.ld_alpha],  # LD-DPO weighs the reference's tail tokens differently
                "adapter_sums": "float32",  # bfloat16 runs compute with rlhf.training.float32_adapter_sums since it came
            },
            sort_keys=True,
            default=str,
        )
        return cache_dir() / "ref_logps" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if return_outputs or self.args.kl_coef == 0:
            return loss
        mode = "train" if self.model.training else "eval"
        kl = self.chosen_kl(model, inputs)
        log_metric(self, mode, "dpo_loss", loss.item())
        log_metric(self, mode, "kl_loss", kl.item())
        return loss + self.args.kl_coef * kl

    def chosen_kl(self, model, inputs) -> torch.Tensor:
        """Mean per-token KL(policy || reference) over the chosen completions' tokens."""
        half = inputs["input_ids"].shape[0] // 2  # batches are [chosen; rejected]
        rows = {"input_ids": inputs["input_ids"][:half], "attention_mask": inputs["attention_mask"][:half], "use_cache": False}
        mask = inputs["completion_mask"][:half, 1:].bool()  # position t-1 predicts token t
        policy_logps = F.log_softmax(model(**rows).logits[:, :-1].float(), dim=-1)
        with torch.no_grad(), self.reference() as reference:
            reference_logps = F.log_softmax(reference(**rows).logits[:, :-1].float(), dim=-1)
        per_token = (policy_logps.exp() * (policy_logps - reference_logps)).sum(dim=-1)
        return per_token[mask].mean()

    def reference(self):
        """The reference model: TRL's ref_model, or the policy with its adapter disabled."""
        return as_reference(self.accelerator.unwrap_model(self.model), self.ref_model)

    def pair_scores(self, model, batch):
        """DPO's implicit rewards, beta * (log pi(y|x) - log ref(y|x)), of chosen and rejected."""
        logps = self.completion_logps(model, batch)
        if "ref_chosen_logps" in batch:  # precomputed by TRL
            reference_logps = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        else:
            with self.reference() as reference:
                reference_logps = self.completion_logps(reference, batch)
        return (self.beta * (logps - reference_logps)).chunk(2)

    @staticmethod
    def completion_logps(model, batch) -> torch.Tensor:
        """Sum of log-probabilities of each row's completion tokens, from TRL's fused LM head (the
        one DPO's loss reads): it scores the completion positions without the full logits."""
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
        output = model(**rows, labels=labels, fused_lm_head=True)
        return output.log_probs.sum(dim=1)
