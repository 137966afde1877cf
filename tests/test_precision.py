"""Mixed precision where the hardware has it: on the CPU preset a real model trains in bfloat16
autocast (float32 weights) when the CPU has bfloat16 matrix units, the tiny model in float32,
`hardware.training_args.bf16` forces either; the choice is printed and recorded in env.json,
and the stages with their own loops (PPO, eval) use the same autocast."""

import json
import math

import pytest
from conftest import assert_same_metrics, compose_config, train, train_through_a_crash

from rlhf import cpu_bf16, precision


def test_the_cpu_preset_chooses_bfloat16_where_the_cpu_has_it_and_never_for_the_tiny_model():
    real = compose_config("model=smollm2-135m", "stage=dpo")
    assert real.hardware.training_args.bf16 is cpu_bf16()
    assert precision(real) == "float32 weights" + (", bfloat16 autocast" if cpu_bf16() else "")
    assert compose_config("stage=dpo").hardware.training_args.bf16 is False  # model=tiny: float32 is faster
    assert compose_config("model=smollm2-135m", "hardware.training_args.bf16=false").hardware.training_args.bf16 is False
    assert compose_config("hardware.training_args.bf16=true").hardware.training_args.bf16 is True


def test_cpu_bf16_reads_the_cpu_flags(monkeypatch, tmp_path):
    from pathlib import Path

    cpuinfo = tmp_path / "cpuinfo"
    original = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: original(cpuinfo if str(self) == "/proc/cpuinfo" else self, *a, **k))
    cpuinfo.write_text("flags : fpu sse avx512f avx512_bf16\n")
    assert cpu_bf16() is True
    assert cpu_bf16(False) is False  # a model whose config says autocast does not pay (model.cpu_bf16)
    # configs saved before model.cpu_bf16 pass the model's name: they re-run in the precision they ran in
    assert cpu_bf16("builtin:smollm2-135m") is True and cpu_bf16("builtin:tiny") is False
    cpuinfo.write_text("flags : fpu sse avx2\n")
    assert cpu_bf16() is False


def test_ppo_and_eval_run_under_bfloat16_autocast_when_asked(rlhf_chain, tmp_path, capsys):
    chain_dir, _ = rlhf_chain
    forced = "hardware.training_args.bf16=true"
    metrics = train(
        tmp_path / "ppo",
        "stage=ppo",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={chain_dir / 'rm'}",
        "ppo.total_updates=2",
        "ppo.eval_prompts=16",
        forced,
    )
    assert all(math.isfinite(metrics[key]) for key in ("eval_scores", "objective/kl", "loss/policy"))
    # The policy moves: before autocast's weight cache was switched off, every forward pass inside
    # PPO's one autocast block used the starting adapter (KL, approxkl and the gain were exactly 0).
    assert metrics["policy/approxkl"] > 0 and metrics["objective/kl"] != 0 and metrics["eval_score_gain"] != 0
    assert "precision: float32 weights, bfloat16 autocast" in capsys.readouterr().out
    assert json.loads((tmp_path / "ppo" / "env.json").read_text())["precision"] == "float32 weights, bfloat16 autocast"
    judged = train(
        tmp_path / "eval",
        "stage=eval",
        f"eval.policy={tmp_path / 'ppo'}",
        f"eval.reward_model={chain_dir / 'rm'}",
        "eval.num_prompts=8",
        forced,
    )
    assert 0 <= judged["eval_win_rate"] <= 1 and math.isfinite(judged["eval_kl"])


def test_ppo_moves_a_policy_over_bfloat16_weights(rlhf_chain, tmp_path):
    """The GPU presets' case (bfloat16 weights under bfloat16 autocast), here on the CPU: PPO's
    own forward passes see the adapter it trains."""
    chain_dir, _ = rlhf_chain
    metrics = train(
        tmp_path,
        "stage=ppo",
        f"model.init_from={chain_dir / 'sft'}",
        f"ppo.reward_model={chain_dir / 'rm'}",
        "ppo.total_updates=3",
        "ppo.eval_prompts=16",
        "hardware.dtype=bfloat16",
        "hardware.training_args.bf16=true",
    )
    assert metrics["policy/approxkl"] > 0 and metrics["objective/kl"] != 0 and metrics["eval_score_gain"] != 0


@pytest.mark.slow
def test_a_bfloat16_dpo_run_crashed_midway_resumes_to_the_metrics_of_an_uninterrupted_one(tmp_path, monkeypatch, capsys):
    from trl import DPOTrainer

    overrides = ("stage=dpo", "hardware.training_args.bf16=true", "dpo.max_steps=10", "dpo.save_steps=5", "dpo.eval_steps=5")
    whole = train(tmp_path / "whole", *overrides)
    capsys.readouterr()
    resumed = train_through_a_crash(monkeypatch, DPOTrainer, "training_step", 7, tmp_path / "crashed", *overrides)
    assert "resuming from" in capsys.readouterr().out  # from checkpoint-5, not from the start
    assert json.loads((tmp_path / "crashed" / "env.json").read_text())["precision"] == "float32 weights, bfloat16 autocast"
    assert_same_metrics(resumed, whole, 1e-6)


def test_lora_updates_below_a_bfloat16_step_survive_autocast():
    import torch
    from peft import LoraConfig, get_peft_model

    from rlhf.compat import float32_adapter_sums

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4, bias=False)

        def forward(self, x):
            return self.proj(x)

    def adapted(hooked: bool):
        torch.manual_seed(0)
        layer = Layer()
        layer.proj.weight.data = torch.eye(4) * 4.0  # outputs of 4..16: a bfloat16 step there is 1/32 or more
        if hooked:  # as load_model does for a bfloat16-autocast run, before anyone adds an adapter
            layer.register_forward_pre_hook(float32_adapter_sums)
        model = get_peft_model(layer, LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]))
        torch.nn.init.constant_(model.base_model.model.proj.lora_B["default"].weight, 1e-3)  # an update of ~4e-3
        return model

    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    with torch.no_grad():
        plain, hooked = adapted(False), adapted(True)
        exact = plain(x)
        update = exact - 4.0 * x
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rounded_away = plain(x).float()
            kept = hooked(x).float()
            hooked(x)  # a second pass adds no second hook
    assert update.abs().min() > 1e-3
    assert torch.equal(rounded_away, 4.0 * x)  # autocast alone: the adapter's update is lost entirely
    assert (kept - exact).abs().max() < 0.02 * update.abs().min()  # summed in float32: kept
    assert len(hooked.base_model.model.proj.base_layer._forward_hooks) == 1


def test_every_model_loaded_for_a_bfloat16_run_sums_its_later_adapter_in_float32():
    """load_model hooks the model: an adapter added afterwards (as TRL, PPO and eval add theirs)
    gets its sums in float32 from the first forward pass on, with no call in any stage."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model

    from rlhf.models import load_model
    from rlhf.tiny_model import ensure_tiny_model

    tiny_model_path = str(ensure_tiny_model())
    model_cfg = OmegaConf.create({"trust_remote_code": False})
    bases = {}
    for bf16 in (True, False):
        hardware = OmegaConf.create({"dtype": "float32", "training_args": {"bf16": bf16}})
        model = get_peft_model(load_model(tiny_model_path, model_cfg, None, hardware), LoraConfig(r=2, target_modules=["q_proj"]))
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.tensor([[1, 2, 3]]))
        bases[bf16] = [m.base_layer for name, m in model.named_modules() if name.endswith("q_proj") and hasattr(m, "base_layer")]
    assert bases[True] and all(getattr(layer, "float32_output", False) for layer in bases[True])
    assert not any(getattr(layer, "float32_output", False) for layer in bases[False])  # float32 runs: untouched


def test_dpo_scores_held_out_pairs_in_float32_when_it_trains_in_bfloat16(tmp_path):
    """A DPO implicit reward is beta times the difference of two nearly equal sums of log-probs,
    which bfloat16 rounding swamps. After a bfloat16 DPO run the held-out pass must give the
    margins a float32 copy of the trained policy gives, computed here by hand from full logits."""
    import torch
    from peft import PeftModel

    from rlhf.compat import prepare_inputs
    from rlhf.context import RunContext
    from rlhf.dpo_trainer import KLDPOTrainer
    from rlhf.lifecycle import load_inputs, trainer_kwargs

    cfg = compose_config(
        "stage=dpo", "hardware.training_args.bf16=true", "dpo.max_steps=4", "dpo.learning_rate=1e-3", "dpo.ref_cache=false"
    )
    context = RunContext.open(cfg, tmp_path)
    inputs = load_inputs(context, data_kind="preference")
    trainer = KLDPOTrainer(ref_model=None, **trainer_kwargs(context, cfg.dpo, inputs))
    trainer.train()
    trained = trainer.accelerator.unwrap_model(trainer.model)
    batch = prepare_inputs(trainer, next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad():
        chosen, rejected = trainer.pair_scores(trained, batch)
    trained.save_pretrained(str(tmp_path / "adapter"))

    float32_cfg = compose_config("stage=dpo", "hardware.training_args.bf16=false")
    copy = PeftModel.from_pretrained(inputs.lineage.load(float32_cfg.hardware), str(tmp_path / "adapter")).eval()

    def completion_logps(model) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        token_logps = torch.log_softmax(logits.double(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)

    with torch.no_grad():
        policy = completion_logps(copy)
        with copy.disable_adapter():
            reference = completion_logps(copy)
    by_hand = (trainer.beta * (policy - reference)).chunk(2)
    assert by_hand[0].abs().max() > 1e-3  # the policy moved: there is a margin to get right
    for got, expected in zip((chosen, rejected), by_hand):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-5)


def test_eval_computes_its_kl_in_float32_at_the_training_temperature(rlhf_chain, monkeypatch, tmp_path):
    """eval's KL sums log pi - log ref over the policy's answers: under bfloat16 autocast the
    rounding of two nearly equal log-probs swamps it, so each answer's KL must be the float32 one,
    whatever precision sampled it. And it is measured where PPO's target steers it: on answers
    sampled at the policy's training temperature (1.0), not at eval's 0.7; the judged answers' own
    KL, at 0.7, is the second key."""
    import torch
    from hydra.utils import instantiate

    from rlhf.context import RunContext
    from rlhf.generation import response_logprobs
    from rlhf.lineage import POLICY_STAGES, TrainedRun
    from rlhf.stages import eval as evaluation

    chain_dir, _ = rlhf_chain
    cfg = compose_config("stage=eval", "hardware.training_args.bf16=true", "eval.batch_size=6")
    run = TrainedRun.of(chain_dir / "ppo", "policy", POLICY_STAGES)
    assert evaluation.training_temperature(run) == 1.0 != cfg.eval.temperature  # PPO samples at 1.0, eval at 0.7
    (policy, reference), tokenizer = evaluation.load_policy_and_reference(run, cfg), run.start.tokenizer()
    sampled, sample = [], evaluation.sample  # the policy's answers, as the evaluation drew them, and at what temperature

    def recorded(model, tokenizer, prompts, settings, device):
        sampled.append((settings.temperature, sample(model, tokenizer, prompts, settings, device)))
        return sampled[-1][1]

    monkeypatch.setattr(evaluation, "sample", recorded)
    prompts = [[{"role": "user", "content": f"What is {n} plus {n}?"}] for n in range(6)]
    no_reference = {"texts": [""] * 6, "lengths": [1] * 6, "scores": {}}
    device = torch.device("cpu")
    models = (policy, reference, tokenizer)
    with RunContext.open(cfg, tmp_path).autocast():
        rows = evaluation.answer_and_score(prompts, instantiate(cfg.eval), device, models, {}, 0, no_reference, kl_temperature=1.0)
    assert [temperature for temperature, _ in sampled] == [0.7, 1.0]  # the judged answers, then the ones for the KL

    def kl_by_hand(answers, temperature):
        with torch.no_grad():
            policy_logprobs = response_logprobs(policy, answers, temperature)
            with policy.disable_adapter():
                reference_logprobs = response_logprobs(policy, answers, temperature)
        return ((policy_logprobs - reference_logprobs) * answers.response_mask).sum(dim=1)

    judged, for_kl = (kl_by_hand(answers, temperature) for temperature, answers in sampled)
    assert judged.abs().max() > 1e-3  # the policy moved from its start: there is a KL to get right
    assert [row["kl"] for row in rows] == pytest.approx(for_kl.tolist(), abs=1e-5)
    assert [row["kl_at_sampling_temperature"] for row in rows] == pytest.approx(judged.tolist(), abs=1e-5)
    assert judged.tolist() != pytest.approx(for_kl.tolist(), abs=1e-3)  # two temperatures, two quantities


# ---- whole-model training and float32 paths over 16-bit weights -----------------------------

GPU_PRESET_ON_CPU = ("hardware=gpu", "hardware.training_args.use_cpu=true", "hardware.training_args.dataloader_num_workers=0")


def matrices(directory) -> dict:
    """The 2-d weights of a saved model (or of a LoRA adapter), by name, as saved."""
    from pathlib import Path

    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return {name: tensor for name, tensor in tensors.items() if tensor.dim() == 2}


def share_kept(saved: dict, base: dict, update: dict) -> tuple:
    """(<held, update> / |update|^2, |held - update| / |update|) over the tensors `update` names,
    where held = saved - base (the base rounded to each saved tensor's dtype first): the part of
    the update the saved weights hold, and how far they are from holding it exactly."""
    dot = norm2 = error2 = 0.0
    for name, delta in update.items():
        held = saved[name].double() - base[name].to(saved[name].dtype).double()
        dot, norm2 = dot + float((held * delta).sum()), norm2 + float((delta * delta).sum())
        error2 += float(((held - delta) ** 2).sum())
    return dot / norm2, (error2 / norm2) ** 0.5


@pytest.mark.slow
def test_a_full_fine_tune_in_bfloat16_weights_is_refused_in_one_line(tmp_path):
    """AdamW's updates to bfloat16 weights round away: the command trained and kept 0.9% of them."""
    from conftest import cli

    done = cli("peft=none", "hardware.dtype=bfloat16", "sft.learning_rate=1e-6", "sft.max_steps=20", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode != 0 and not (tmp_path / "run" / "final").exists()
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: hardware.dtype=bfloat16 with peft=none:") and "hardware.dtype=float32" in line


def test_the_gpu_presets_train_whole_models_in_float32_master_weights(tmp_path):
    """`hardware=gpu peft=none` (here on the CPU) loads float32 weights under bfloat16 autocast: its
    saved final/ holds most of a 1e-6 update, which bfloat16 weights rounded away (0.9% of entries
    changed). The exact update is the same run in float32 throughout."""
    from rlhf.tiny_model import ensure_tiny_model

    common = ("peft=none", "sft.learning_rate=1e-6", "sft.max_steps=20", "dataset.test_size=0", "sft.save_strategy=no")
    train(tmp_path / "exact", *common)  # the tiny model on the CPU preset: float32, no autocast
    train(tmp_path / "gpu", *common, *GPU_PRESET_ON_CPU)
    assert json.loads((tmp_path / "gpu" / "env.json").read_text())["precision"] == "float32 weights, bfloat16 autocast"
    base, saved = matrices(ensure_tiny_model()), matrices(tmp_path / "gpu" / "final")
    exact = {name: tensor.double() - base[name].double() for name, tensor in matrices(tmp_path / "exact" / "final").items()}
    assert all(tensor.dtype.is_floating_point and tensor.element_size() == 4 for tensor in saved.values())
    assert share_kept(saved, base, exact)[0] > 0.5


def test_a_full_fine_tune_on_a_gpu_preset_folds_upstream_lora_in_float32(tmp_path):
    """A `peft=none` run started from a LoRA run folds that adapter into its weights when it saves:
    in float32 master weights all of it stays (a bfloat16 fold rounds every entry to a bfloat16
    step of its weight: on SmolLM2 it kept 28% of the adapter's update). One step at a
    learning rate far under a float32 step of any weight moves nothing else."""
    from rlhf.tiny_model import ensure_tiny_model

    train(tmp_path / "sft", "sft.max_steps=5", "dataset.test_size=0", "sft.save_strategy=no")
    full = ("peft=none", f"model.init_from={tmp_path / 'sft'}", "sft.max_steps=1", "sft.learning_rate=1e-12", "dataset.test_size=0")
    train(tmp_path / "full", *full, "sft.save_strategy=no", *GPU_PRESET_ON_CPU)
    adapter = matrices(tmp_path / "sft" / "final")
    settings = json.loads((tmp_path / "sft" / "final" / "adapter_config.json").read_text())
    update = {  # scaling B A, by the name of the weight it adapts
        name.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight"): settings["lora_alpha"]
        / settings["r"]
        * adapter[name.replace("lora_A", "lora_B")].double()
        @ a.double()
        for name, a in adapter.items()
        if name.endswith(".lora_A.weight")
    }
    assert update and max(delta.abs().max() for delta in update.values()) > 0
    share, error = share_kept(matrices(tmp_path / "full" / "final"), matrices(ensure_tiny_model()), update)
    assert share == pytest.approx(1, abs=1e-3) and error < 1e-3  # rounding to bfloat16 keeps the share near 1 on average, not each entry


def test_float32_paths_compute_the_output_layer_in_float32_over_bfloat16_weights(tmp_path):
    """DPO's held-out implicit rewards and eval's KL are differences of nearly equal log-probs.
    Over bfloat16 weights (the GPU presets' LoRA runs) the decoder computes in bfloat16, but the
    logits must not be rounded to bfloat16: checked against the bfloat16 decoder's last hidden
    state times the output layer in float64, by hand."""
    import torch

    from rlhf.compat import float32_forward, prepare_inputs
    from rlhf.context import RunContext
    from rlhf.dpo_trainer import KLDPOTrainer
    from rlhf.lifecycle import load_inputs, trainer_kwargs

    cfg = compose_config("stage=dpo", "hardware.dtype=bfloat16", "dpo.max_steps=4", "dpo.learning_rate=1e-3", "dpo.ref_cache=false")
    context = RunContext.open(cfg, tmp_path)
    inputs = load_inputs(context, data_kind="preference")
    trainer = KLDPOTrainer(ref_model=None, **trainer_kwargs(context, cfg.dpo, inputs))
    trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = prepare_inputs(trainer, next(iter(trainer.get_eval_dataloader())))
    rows = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    inner = policy.get_base_model()
    assert inner.get_output_embeddings().weight.dtype == torch.bfloat16

    def by_hand(model) -> tuple:  # (logits, summed completion log-probs), the output layer in float64
        hidden = inner.model(**rows).last_hidden_state  # peft's layers are inside: the adapter applies when enabled
        logits = hidden.double() @ inner.get_output_embeddings().weight.double().T
        token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return logits, (token_logps * batch["completion_mask"][:, 1:]).sum(dim=1)

    with torch.no_grad():
        expected_logits, policy_logps = by_hand(policy)
        with policy.disable_adapter():
            _, reference_logps = by_hand(policy)
        with float32_forward(policy):
            logits = policy(**rows).logits
        chosen, rejected = trainer.pair_scores(policy, batch)
        after = policy(**rows).logits  # the block leaves the model as it was
    assert logits.dtype == torch.float32 and after.dtype == torch.bfloat16
    assert (logits.double() - expected_logits).abs().max() < 1e-4  # bfloat16 logits were off by ~1e-2
    margins = (trainer.beta * (policy_logps - reference_logps)).chunk(2)
    assert margins[0].abs().max() > 1e-3  # the policy moved: there is a margin to get right
    for got, expected in zip((chosen, rejected), margins):
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)
