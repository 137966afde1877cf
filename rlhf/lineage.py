"""What a model stands on, and how to load it exactly as it was trained.

A run started from another run (`model.init_from`) trains on that run's final weights: the
earlier LoRA adapters merged into their base. That merged model is written once per lineage
into the project cache (`merged-<key>/`, a plain transformers directory) and every run of the
lineage loads it from there. So the weights a run trains on are a directory on disk, and the
run's final/adapter_config.json names that directory as its base:
`peft.AutoPeftModelForCausalLM.from_pretrained(final)` rebuilds exactly the trained model on
the machine that trained it. final/lineage.json records the whole chain - the base model and
every adapter by path and sha256 - so that `python -m rlhf.export` can rebuild and merge it
anywhere the base model and the earlier runs are.

Why not name the raw base in adapter_config.json (peft's default)? Loading that drops every
earlier stage without a word: a DPO adapter trained on base + SFT lands on the bare base.
"""

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from rlhf.cache import build_once, cache_dir
from rlhf.models import BUILTIN_PREFIX, load_model, load_tokenizer, merge_adapter, resolve_model_path
from rlhf.runs import POLICY_STAGES, finished_run

LINEAGE_FILE = "lineage.json"  # in every final/: what the run's model stands on
MERGE_RECIPE = 2  # bump when what a merged copy holds changes: its cache key changes with it


@dataclass
class Lineage:
    """A base model and the LoRA adapter directories merged into it, oldest first."""

    base: object  # the base's model settings (name_or_path, hub, revision, trust_remote_code)
    adapters: list = field(default_factory=list)

    @classmethod
    def of(cls, model_cfg) -> "Lineage":
        """What a run configured with `model_cfg` starts from. `model.init_from=<run>` stands on
        that run's trained model; merging its adapter keeps one copy of the weights in memory
        and makes "adapter disabled" mean "the starting policy", so DPO's and PPO's reference is
        the SFT policy, not the raw base model."""
        init_from = model_cfg.get("init_from")
        if not init_from:
            return cls(model_cfg)
        return TrainedRun.of(init_from, "model.init_from", POLICY_STAGES).lineage

    def merged(self, adapter) -> "Lineage":
        """This lineage with `adapter` merged on top."""
        return Lineage(self.base, [*self.adapters, Path(adapter)])

    def base_path(self) -> str:
        return resolve_model_path(self.base)

    def path(self, dtype: str) -> str:
        """A directory holding this lineage's weights in `dtype`: the base itself, or the base
        with the adapters merged in, built once into the cache (model, tokenizer, generation
        config: a standalone transformers directory)."""
        base_path = self.base_path()
        if not self.adapters:
            return base_path
        key = hashlib.sha256(json.dumps([MERGE_RECIPE, base_path, dtype, self.adapter_digests()]).encode())
        return str(build_once(cache_dir() / f"merged-{key.hexdigest()[:16]}", lambda out: self._merge_into(out, dtype)))

    def _merge_into(self, out: Path, dtype: str) -> None:
        model = load_model(self.base_path(), self.base, None, OmegaConf.create({"dtype": dtype}))
        for adapter in self.adapters:
            model = merge_adapter(model, adapter)
        model.save_pretrained(out)
        load_tokenizer(self.base_path(), self.base).save_pretrained(out)

    def load(self, hardware_cfg, quantization_cfg=None, head: str = "causal_lm"):
        """The model this lineage describes, in the hardware's dtype, quantized if asked (a reward
        model with its tokenizer's pad id)."""
        pad_token_id = self.tokenizer().pad_token_id if head == "reward" else None
        return load_model(self.path(hardware_cfg.dtype), self.base, quantization_cfg, hardware_cfg, head=head, pad_token_id=pad_token_id)

    def tokenizer(self):
        return load_tokenizer(self.base_path(), self.base)

    def adapter_digests(self) -> list:
        return [sha256_file(Path(adapter) / "adapter_model.safetensors") for adapter in self.adapters]

    def identity(self, dtype: str, quantization_cfg) -> str:
        """A string that changes whenever the weights this lineage loads to could: the base's
        weight files by content, every adapter by content, the dtype and the quantization."""
        quantization = OmegaConf.to_container(quantization_cfg, resolve=True) if quantization_cfg is not None else None
        return json.dumps([self.base_path(), weights_digest(self.base_path()), self.adapter_digests(), dtype, quantization])

    def loadable_base(self, dtype: str) -> tuple:
        """(name, revision) that plain transformers/peft load this lineage's weights from: the hub
        id and the snapshot's commit for an untouched hub model (loadable anywhere), else the
        local directory (the merged copy for a lineage with adapters)."""
        name = str(self.base.name_or_path)
        path = Path(self.path(dtype))
        if self.adapters or name.startswith(BUILTIN_PREFIX) or Path(name).expanduser().is_dir():
            return str(path.resolve()), None
        revision = path.name if path.parent.name == "snapshots" else self.base.get("revision")
        return name, revision

    def record(self, dtype: str) -> dict:
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
            "merged_weights": str(Path(self.path(dtype)).resolve()),
            "dtype": dtype,
        }


@dataclass
class TrainedRun:
    """A finished run's model: what it started from and what it saved in final/."""

    cfg: object  # the run's saved config
    start: Lineage  # the weights the run trained on
    adapter: Path | None  # final/ when it holds a LoRA adapter; None when final/ is a whole model
    final: Path

    @classmethod
    def of(cls, run_dir, key: str, stages: tuple) -> "TrainedRun":
        """The finished run at `run_dir`; `key` names the setting that pointed there, for errors."""
        run_dir = Path(str(run_dir)).expanduser().resolve()
        cfg = finished_run(run_dir, key, stages=stages)
        final = run_dir / "final"
        adapter = final if (final / "adapter_config.json").is_file() else None
        return cls(cfg, Lineage.of(cfg.model), adapter, final)

    @property
    def lineage(self) -> Lineage:
        """The trained model as a lineage: the start with the adapter merged, or the whole model
        as a base of its own (what it started from is in its weights)."""
        if self.adapter is not None:
            return self.start.merged(self.adapter)
        return Lineage(OmegaConf.merge(self.start.base, {"name_or_path": str(self.final), "init_from": None}))

    def load(self, hardware_cfg, quantization_cfg=None, head: str = "causal_lm", merge: bool = False):
        """The model exactly as the run trained it: its start loaded as the run loaded it with the
        adapter on top (a PeftModel, or folded in with merge=True), or the whole final model."""
        from peft import PeftModel

        if self.adapter is None:
            return self.lineage.load(hardware_cfg, quantization_cfg, head=head)
        start = self.start.load(hardware_cfg, quantization_cfg, head=head)
        if merge:
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
        "trained_on": lineage.record(dtype),
        "quantization": OmegaConf.to_container(cfg.quantization, resolve=True) if cfg.quantization is not None else None,
        "how_to_load": (
            "on this machine: peft.AutoPeftModelFor{CausalLM|SequenceClassification}.from_pretrained(<final>) "
            "(with the quantization above, if any); anywhere: python -m rlhf.export <run dir> <out dir>"
        ),
    }
    if adapter_config.is_file():
        name, revision = lineage.loadable_base(dtype)
        settings = json.loads(adapter_config.read_text())
        settings.update(base_model_name_or_path=name, revision=revision)
        adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (final / LINEAGE_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


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
