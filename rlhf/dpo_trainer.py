"""DPO on TRL's DPOTrainer, kept small and on top of TRL's own loss code:

- an explicit KL penalty, `dpo.kl_coef` times the mean per-token KL(policy || reference) over the
  chosen responses' tokens;
- the reference log-probs cached on disk across runs (`dpo.ref_cache`, rlhf/ref_logps.py);
- the preference metrics at every evaluation (rlhf/preference_eval.py).
"""

import functools
import hashlib
import json
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer

from rlhf import distributed
from rlhf.cache import REFERENCE_LOGPS, cache_dir
from rlhf.compat import ReferenceLogpsHook, float32_forward, log_metric, prepare_inputs
from rlhf.generation import as_reference
from rlhf.preference_eval import PreferenceEvaluation
from rlhf.ref_logps import REF_COLUMNS, REF_ROW, collate_with_rows, read_ref_cache, write_ref_cache


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


class KLDPOTrainer(PreferenceEvaluation, ReferenceLogpsHook, DPOTrainer):
    """TRL's DPOTrainer; with kl_coef > 0 the loss becomes

        L = L_DPO + kl_coef * mean_t KL(pi(.|x, y_<t) || ref(.|x, y_<t))

    over the non-padding tokens t of the chosen responses y. The KL is exact over the vocabulary
    at each position (not a single-token estimate: the chosen tokens are not samples of the
    policy). Both parts are logged as `dpo_loss` and `kl_loss`. With kl_coef = 0 the loss is
    TRL's, untouched."""

    def __init__(self, *args, reference_identity: str = "", **kwargs):
        self.reference_identity = reference_identity  # what the reference model is, for the cache key
        self.run_metrics = {}  # what fit() adds to metrics.json: the reference log-probs' seconds and rows
        self.lazy_reference = None  # (cache path, the train split's values, NaN where not computed yet)
        super().__init__(*args, **kwargs)

    def reference_logps(self, dataset, name, batch_size):
        """TRL's precomputation of reference log-probs, kept on disk across runs: a beta sweep
        computes them once. The key covers the reference model (base, merged adapters, dtype,
        quantization), the tokenizer, the tokenized rows, and the truncation settings, so any
        change there computes them anew. A run whose steps reach fewer training rows than the
        split holds computes them as training reaches each row, and adds them to the cache."""
        start = time.perf_counter()
        dataset = self._cached_ref_logps(dataset, name, batch_size)
        self.run_metrics["time/reference_logps"] = self.run_metrics.get("time/reference_logps", 0.0) + time.perf_counter() - start
        return dataset

    def rows_reached(self, name: str, rows: int) -> int:
        """How many rows of the split the run reads: training stops after max_steps batches."""
        per_step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.accelerator.num_processes
        if name != "train" or self.args.max_steps <= 0:
            return rows
        return min(rows, self.args.max_steps * per_step)

    def _cached_ref_logps(self, dataset, name, batch_size):
        path = self.ref_cache_path(dataset) if self.args.ref_cache and self.reference_identity else None
        reached = self.rows_reached(name, len(dataset))
        if path is not None and reached < len(dataset) and self.accelerator.num_processes == 1:
            return self.reference_as_reached(dataset, path, reached)
        main = self.accelerator.is_main_process
        cached = read_ref_cache(path, len(dataset)) if main and path is not None and path.is_file() else None
        # Rank 0 decides, and hands every rank its values: TRL's precompute below is collective, so
        # ranks that decided alone (a file written between their checks, a node-local cache) would
        # enter it alone and wait forever.
        cached = distributed.from_main_process(cached)
        fresh = cached is None
        if fresh and self.accelerator.num_processes > 1:
            cached = self.whole_split_on_rank_zero(dataset, batch_size)
        if name == "train":
            self.run_metrics.update(ref_logps_rows=len(dataset) if fresh else 0, ref_logps_cached_rows=0 if fresh else len(dataset))
        if cached is not None:
            if not fresh:
                print(f"reference log-probs of the {name} split: loaded from {path}", flush=True)
            elif path is not None and main:
                write_ref_cache(path, cached)
            for column in REF_COLUMNS:
                dataset = dataset.add_column(column, cached[column].tolist())
            return dataset
        dataset = self.trl_reference_logps(dataset, name, batch_size)
        if path is not None and main:
            write_ref_cache(path, {c: torch.tensor(list(dataset[c]), dtype=torch.float32) for c in REF_COLUMNS})
        return dataset

    @torch.no_grad()
    def whole_split_on_rank_zero(self, dataset, batch_size: int) -> dict:
        """The reference log-probs of every row, computed by rank 0 alone and handed to every
        process. TRL 1.16's own pass cannot serve several processes with the datasets built here
        in memory: rank 0 writes the values to an Arrow file under its own temporary directory,
        which the other ranks then open and do not find. The model is not wrapped for DDP yet, so
        one process's forward passes need no other (a ZeRO-3-sharded model would: untested)."""
        values = None
        if self.accelerator.is_main_process:
            loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
            model = self.ref_model or self.model
            parts = [self.compute_ref_log_probs(model, prepare_inputs(self, batch)) for batch in loader]
            values = {column: torch.cat([part[i] for part in parts]).float().cpu() for i, column in enumerate(REF_COLUMNS)}
        return distributed.from_main_process(values)

    def reference_as_reached(self, dataset, path, reached: int):
        """The train split with the cached reference log-probs and NaN where none is cached yet;
        `compute_loss` fills those in for the rows each batch holds (one process only: the
        computed rows are gathered nowhere else)."""
        cached = read_ref_cache(path, len(dataset), complete=False) if path.is_file() else None
        values = cached or {c: torch.full((len(dataset),), float("nan")) for c in REF_COLUMNS}
        known = int((~values[REF_COLUMNS[0]].isnan()).sum())
        print(f"reference log-probs of the train split: {known} of {len(dataset)} rows cached; the run reaches {reached}", flush=True)
        self.lazy_reference = (path, values)
        self.run_metrics.update(ref_logps_rows=0, ref_logps_cached_rows=known)
        for column in REF_COLUMNS:
            dataset = dataset.add_column(column, values[column].tolist())
        self.data_collator = functools.partial(collate_with_rows, self.data_collator)
        self.extra_columns = (REF_ROW,)  # kept by the Trainer, which drops columns the model does not take
        return dataset.add_column(REF_ROW, list(range(len(dataset))))

    def fill_reference(self, inputs) -> None:
        """Compute the reference log-probs of the batch's rows that have none yet, in place, and
        keep them for the cache."""
        rows = inputs.pop(REF_ROW)
        missing = inputs[REF_COLUMNS[0]].isnan() | inputs[REF_COLUMNS[1]].isnan()
        if not missing.any():
            return
        computed = self.compute_ref_log_probs(self.model, {k: v for k, v in inputs.items() if k not in REF_COLUMNS})
        _, values = self.lazy_reference
        for column, fresh in zip(REF_COLUMNS, computed):
            fresh = fresh.detach().to(inputs[column].dtype)
            inputs[column] = torch.where(missing, fresh, inputs[column])
            values[column][rows[missing].cpu()] = fresh[missing].float().cpu()
        self.run_metrics["ref_logps_rows"] += int(missing.sum())

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        if self.lazy_reference is not None and self.run_metrics["ref_logps_rows"]:
            write_ref_cache(*self.lazy_reference)
        return result

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
                "adapter_sums": "float32",  # bfloat16 runs compute with rlhf.compat.float32_adapter_sums since it came
            },
            sort_keys=True,
            default=str,
        )
        return cache_dir() / REFERENCE_LOGPS / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if REF_ROW in inputs:
            self.fill_reference(inputs)
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
        """DPO's implicit rewards, beta * (log pi(y|x) - log ref(y|x)), of chosen and rejected, in
        float32 whatever the training precision. The log-ratio is the difference of two nearly
        equal sums of log-probs, and bfloat16's rounding swamps it: on SmolLM2 after 25 DPO steps
        the same adapter ranked 67 of 122 held-out pairs right under autocast and 75 in float32
        (per-pair margins moved by 0.46 nats, sd, against a spread of 0.71). So the reference is
        recomputed here rather than read from the training precision's precomputed values."""
        with float32_forward(model):
            logps = self.completion_logps(model, batch)
            with self.reference() as reference, float32_forward(reference):
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
