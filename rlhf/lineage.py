"""What a model stands on, how to load it exactly as it was trained, and whether it still can be.

A run started from another run (`model.init_from`) trains on that run's final weights: the
earlier LoRA adapters on top of their base. Where that is exact - float32 weights computed in
float32 - the adapters are merged into one float32 copy written once per lineage into the
project cache (`merged-<key>/`, a plain transformers directory) that every run of the lineage
loads. In bfloat16 or quantized the merge would round the updates away, so the adapters are
stacked beside the frozen base instead (`rlhf.models.stack_adapters`): the model computes as the
earlier runs trained it. Either way the run's final/adapter_config.json names the float32
merged copy as its base: `peft.AutoPeftModelForCausalLM.from_pretrained(final)` rebuilds the
trained model on the machine that trained it. final/lineage.json records the whole chain - the
base model and every adapter by path and sha256 - and every later use of the run (a run started
from it, a reward model, eval, export, sample) checks that chain against the files as they are
now: an upstream run retrained in place stops the use with one line instead of putting an
adapter on a model it never saw.

Why not name the raw base in adapter_config.json (peft's default)? Loading that drops every
earlier stage without a word: a DPO adapter trained on base + SFT lands on the bare base.
"""

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from rlhf import BUILTIN_PREFIX
from rlhf.cache import MERGED_LINEAGE_PREFIX, build_once, cache_dir, sha256_file
from rlhf.errors import UserError
from rlhf.models import load_model, load_tokenizer, merge_adapter, merging_is_exact, resolve_model_path, stack_adapters
from rlhf.runs import POLICY_STAGES, finished_run

LINEAGE_FILE = "lineage.json"  # in every final/: what the run's model stands on
MERGE_RECIPE = 3  # bump when what a merged copy holds changes: its cache key changes with it
FULL_PRECISION = OmegaConf.create({"dtype": "float32"})  # merged copies are float32: exact


@dataclass
class Lineage:
    """A base model and the LoRA adapter directories on top of it, oldest first."""

    base: object  # the base's model settings (name_or_path, hub, revision, trust_remote_code)
    adapters: list = field(default_factory=list)
    _digests: list | None = field(default=None, repr=False, compare=False)  # the adapters' sha256, read once
    _base_path: str | None = field(default=None, repr=False, compare=False)  # the base's directory, resolved once

    @classmethod
    def of(cls, model_cfg) -> "Lineage":
        """What a run configured with `model_cfg` starts from. `model.init_from=<run>` stands on
        that run's trained model, its adapter included, so that "adapter disabled" means "the
        starting policy": DPO's and PPO's reference is the SFT policy, not the raw base model."""
        init_from = model_cfg.get("init_from")
        if not init_from:
            return cls(model_cfg)
        return TrainedRun.of(init_from, "model.init_from", POLICY_STAGES).lineage

    def merged(self, adapter) -> "Lineage":
        """This lineage with `adapter` on top."""
        return Lineage(self.base, [*self.adapters, Path(adapter)], _base_path=self._base_path)

    def base_path(self) -> str:
        """The base's local directory, resolved once per lineage: for a hub id that is a snapshot
        lookup (or a download), for a built-in model a check of the cache."""
        if self._base_path is None:
            self._base_path = resolve_model_path(self.base)
        return self._base_path

    def path(self) -> str:
        """A directory holding this lineage's weights in float32: the base itself, or the base
        with the adapters merged in, built once into the cache (model, tokenizer, generation
        config: a standalone transformers directory), keyed by every input's content."""
        base_path = self.base_path()
        if not self.adapters:
            return base_path
        key = hashlib.sha256(json.dumps([MERGE_RECIPE, base_path, weights_digest(base_path), self.adapter_digests()]).encode())
        return str(build_once(cache_dir() / f"{MERGED_LINEAGE_PREFIX}{key.hexdigest()[:16]}", self._merge_into))

    def _merge_into(self, out: Path) -> None:
        model = load_model(self.base_path(), self.base, None, FULL_PRECISION)
        for adapter in self.adapters:
            model = merge_adapter(model, adapter)
        model.save_pretrained(out)
        load_tokenizer(self.base_path(), self.base).save_pretrained(out)

    def load(self, hardware_cfg, quantization_cfg=None, head: str = "causal_lm"):
        """The model this lineage describes, in the hardware's dtype, quantized if asked (a reward
        model with its tokenizer's pad id): the float32 merged copy where merging is exact, else
        the base with the adapters stacked (`rlhf.models.merging_is_exact`)."""
        pad_token_id = self.tokenizer().pad_token_id if head == "reward" else None
        if merging_is_exact(hardware_cfg, quantization_cfg):
            return load_model(self.path(), self.base, quantization_cfg, hardware_cfg, head=head, pad_token_id=pad_token_id)
        model = load_model(self.base_path(), self.base, quantization_cfg, hardware_cfg, head=head, pad_token_id=pad_token_id)
        stack_adapters(model, self.adapters, head=head)
        return model

    def tokenizer(self):
        return load_tokenizer(self.base_path(), self.base)

    def adapter_digests(self) -> list:
        """The adapters' sha256, read at first use and kept: what the run recorded is what it loaded."""
        if self._digests is None:
            self._digests = [sha256_file(Path(adapter) / "adapter_model.safetensors") for adapter in self.adapters]
        return self._digests

    def identity(self, dtype: str, quantization_cfg) -> str:
        """A string that changes whenever the weights this lineage loads to could: the base's
        weight files by content, every adapter by content, the dtype and the quantization. Not
        where they lie: the same weights from another cache directory or machine are the same."""
        quantization = OmegaConf.to_container(quantization_cfg, resolve=True) if quantization_cfg is not None else None
        return json.dumps([weights_digest(self.base_path()), self.adapter_digests(), dtype, quantization])

    def loadable_base(self) -> tuple:
        """(name, revision) that plain transformers/peft load this lineage's weights from: the hub
        id and the snapshot's commit for an untouched hub model (loadable anywhere), else the
        local directory (the float32 merged copy for a lineage with adapters)."""
        name = str(self.base.name_or_path)
        path = Path(self.path())
        if self.adapters or name.startswith(BUILTIN_PREFIX) or Path(name).expanduser().is_dir():
            return str(path.resolve()), None
        revision = path.name if path.parent.name == "snapshots" else self.base.get("revision")
        return name, revision

    def record(self, dtype: str, stacked: bool) -> dict:
        return {
            "base": {
                "name_or_path": str(self.base.name_or_path),
                "revision": self.base.get("revision"),
                "path": str(Path(self.base_path()).resolve()),
                "weights_sha256": weights_digest(self.base_path()),
            },
            "adapters": [
                {"path": str(Path(adapter).resolve()), "sha256": digest} for adapter, digest in zip(self.adapters, self.adapter_digests())
            ],
            "adapters_applied": "stacked beside the base" if stacked and self.adapters else "merged (float32)",
            "merged_weights": str(Path(self.path()).resolve()),
            "dtype": dtype,
        }

    def check_against(self, recorded: dict, run_dir: Path, key: str) -> None:
        """Stop with one line when the files this lineage names are no longer the ones a run
        trained on (`recorded`: its lineage.json's "trained_on")."""
        retrain = f"retrain {run_dir} on it, or point {key} at a run trained on what is there now"
        base = recorded["base"]
        now = weights_digest(self.base_path())
        if now != base["weights_sha256"]:
            raise UserError(
                f"{key}={run_dir}: it was trained on the base model {base['path']} with weights sha256 {base['weights_sha256'][:12]}, "
                f"which are now {now[:12]}: {retrain}"
            )
        then = recorded["adapters"]
        if len(then) != len(self.adapters):
            raise UserError(
                f"{key}={run_dir}: it was trained on {len(then)} earlier adapters, its config now names {len(self.adapters)}: {retrain}"
            )
        for adapter, current, current_digest in zip(then, self.adapters, self.adapter_digests()):
            if adapter["sha256"] != current_digest:  # by content: a run directory may move
                raise UserError(
                    f"{key}={run_dir}: it was trained on {Path(adapter['path']).parent} as it was then (adapter sha256 "
                    f"{adapter['sha256'][:12]}); {Path(current).resolve().parent} now holds another "
                    f"(sha256 {current_digest[:12]}): {retrain}"
                )


@dataclass
class TrainedRun:
    """A finished run's model: what it started from and what it saved in final/."""

    cfg: object  # the run's saved config
    start: Lineage  # the weights the run trained on
    adapter: Path | None  # final/ when it holds a LoRA adapter; None when final/ is a whole model
    final: Path
    head: str  # what final/ holds, as lineage.json records it: "causal_lm" (a policy) or "reward"

    @classmethod
    def of(cls, run_dir, key: str, stages: tuple) -> "TrainedRun":
        """The finished run at `run_dir`, checked against what it recorded it was trained on;
        `key` names the setting that pointed there, for errors."""
        run_dir = Path(str(run_dir)).expanduser().resolve()
        cfg = finished_run(run_dir, key, stages=stages)
        final = run_dir / "final"
        record = final / LINEAGE_FILE
        if not record.is_file():
            raise UserError(
                f"{key}={run_dir}: final/{LINEAGE_FILE} is missing, so what the run was trained on cannot be checked; retrain it"
            )
        recorded = json.loads(record.read_text())
        if "head" not in recorded:
            raise UserError(f"{key}={run_dir}: final/{LINEAGE_FILE} does not say whether it holds a policy or a reward model; retrain it")
        start = Lineage.of(cfg.model)
        start.check_against(recorded["trained_on"], run_dir, key)
        adapter = final if (final / "adapter_config.json").is_file() else None
        return cls(cfg, start, adapter, final, recorded["head"])

    @property
    def lineage(self) -> Lineage:
        """The trained model as a lineage: the start with the adapter on top, or the whole model
        as a base of its own (what it started from is in its weights)."""
        if self.adapter is not None:
            return self.start.merged(self.adapter)
        return Lineage(OmegaConf.merge(self.start.base, {"name_or_path": str(self.final), "init_from": None}))

    @property
    def quantization(self):
        """The quantization the run trained its adapter over (None: none): a later run that loads
        the model to use it, not to train on it (eval's policy, a reward model), loads it so."""
        return self.cfg.get("quantization")

    def input_length(self, tokenizer=None) -> int:
        """The length a reward model cuts its inputs to: its run's rm.max_length, else its tokenizer's."""
        return int(self.cfg.rm.get("max_length") or (tokenizer or self.start.tokenizer()).model_max_length)

    def load(self, hardware_cfg, quantization_cfg=None, head: str = "causal_lm", merge: bool = False):
        """The model exactly as the run trained it: its start loaded as the run loaded it with the
        adapter on top (a PeftModel, or folded in with merge=True where merging is exact), or the
        whole final model."""
        from peft import PeftModel

        if self.adapter is None:
            return self.lineage.load(hardware_cfg, quantization_cfg, head=head)
        start = self.start.load(hardware_cfg, quantization_cfg, head=head)
        if merge and merging_is_exact(hardware_cfg, quantization_cfg):
            return merge_adapter(start, self.adapter)
        return PeftModel.from_pretrained(start, str(self.adapter))


def write_final_lineage(final: Path, lineage: Lineage, cfg, head: str) -> None:
    """Say in final/ what the run's model stands on, and point its adapter (if it saved one) at
    the exact weights it was trained on, so plain peft loading rebuilds the trained model."""
    dtype = cfg.hardware.dtype
    adapter_config = final / "adapter_config.json"
    record = {
        "stage": cfg.stage,
        "head": head,
        "final": "lora adapter" if adapter_config.is_file() else "whole model",
        "trained_on": lineage.record(dtype, stacked=not merging_is_exact(cfg.hardware, cfg.quantization)),
        "quantization": OmegaConf.to_container(cfg.quantization, resolve=True) if cfg.quantization is not None else None,
        "how_to_load": (
            "on the machine that trained it: peft.AutoPeftModelFor{CausalLM|SequenceClassification}.from_pretrained(<final>) "
            "(with the quantization above, if any); anywhere: python -m rlhf.export <run dir> <out dir>"
        ),
    }
    if adapter_config.is_file():
        name, revision = lineage.loadable_base()
        settings = json.loads(adapter_config.read_text())
        settings.update(base_model_name_or_path=name, revision=revision)
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (final / LINEAGE_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def weights_digest(model_dir) -> str:
    """One sha256 over a model directory's weight files. A Hugging Face cache snapshot links each
    file to a blob named by its sha256, so a hub model is never read in full; other files are
    hashed once per process and state (name, size, modification time)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    return _weights_digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=64)
def _weights_digest(files: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in files:
        path = Path(name)
        blob = path.resolve()
        known = blob.name if path.is_symlink() and len(blob.name) == 64 and blob.parent.name == "blobs" else None
        digest.update(f"{path.name}:{known or sha256_file(path)}\n".encode())
    return digest.hexdigest()
