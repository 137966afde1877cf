"""The online RL numbers on models set up as the reference workflow's Qwen models are: a reward
model scores where the text ends whatever its config's pad id, samples come from the
distribution the log-probs describe, a PPO update is the same on 1 and 2 processes, ranks take
the DPO cache decision together, a reference that would not be the starting policy is refused,
and held-out scores before and after training are paired."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ONE_SMALL_PPO_UPDATE, cli, reward_model_as_ppo_loads_it, train

SHORT = [{"role": "user", "content": "你好"}]
LONG = [{"role": "user", "content": "请用三句话介绍一下你最喜欢的季节，并说明为什么喜欢它。"}]


def tiny_copy_without_a_pad_id(model: Path) -> Path:
    """A copy of the tiny model at `model` whose config and generation config name no pad id."""
    from rlhf.tiny_model import ensure_tiny_model

    shutil.copytree(ensure_tiny_model(), model)
    for name in ("config.json", "generation_config.json"):
        settings = json.loads((model / name).read_text())
        settings.pop("pad_token_id", None)
        (model / name).write_text(json.dumps(settings))
    return model


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
    """A copy of the tiny model set up as Qwen2.5/Qwen3 ship: no pad id in the config, and a
    tokenizer that pads with <|endoftext|>, not with its EOS <|im_end|>; an RM and a policy
    trained on it."""
    root = tmp_path_factory.mktemp("qwen_like")
    model = tiny_copy_without_a_pad_id(root / "model")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] != tokenizer_config["eos_token"]
    base = ("model=custom", f"model.name_or_path={model}", "dataset.test_size=8", "dataset.max_samples=64")
    train(root / "rm", "stage=rm", *base, "rm.max_steps=2", "rm.eval_strategy=no", "rm.save_strategy=no", "rm.max_length=256")
    train(root / "sft", "stage=sft", *base, "sft.max_steps=2", "sft.eval_strategy=no", "sft.save_strategy=no", "sft.max_length=256")
    return root


def alone_and_batched(score) -> tuple:
    """score(prompts, responses) of the short row alone and beside a longer row (which pads it)."""
    alone = score([SHORT], ["好的。"])
    batched = score([SHORT, LONG], ["好的。", "我最喜欢秋天，因为天气凉爽，树叶变成金黄色，而且空气很清新。"])
    return alone[0].item(), batched[0].item()


def test_reward_model_scores_a_row_alike_alone_and_padded_through_ppos_scoring(qwen_like):

    reward = reward_model_as_ppo_loads_it(qwen_like / "rm", "model=custom", f"model.name_or_path={qwen_like / 'model'}")
    assert reward.model.config.pad_token_id == reward.tokenizer.pad_token_id != reward.tokenizer.eos_token_id
    alone, batched = alone_and_batched(lambda p, r: reward.scores(p, r, torch.device("cpu")))
    assert batched == pytest.approx(alone, abs=1e-4)
    # whatever the config says: the score is read from the attention mask
    reward.model.config.pad_token_id = reward.tokenizer.eos_token_id
    assert alone_and_batched(lambda p, r: reward.scores(p, r, torch.device("cpu")))[1] == pytest.approx(alone, abs=1e-4)


def test_reward_model_scores_a_row_alike_alone_and_padded_after_export(qwen_like, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf.export import export

    export(qwen_like / "rm", tmp_path / "out")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert model.config.pad_token_id == tokenizer.pad_token_id

    def score(prompts, responses):  # plain transformers, as a user of the export scores
        chats = [p + [{"role": "assistant", "content": r}] for p, r in zip(prompts, responses)]
        texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in chats]
        with torch.no_grad():
            return model(**tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)).logits[:, 0]

    alone, batched = alone_and_batched(score)
    assert batched == pytest.approx(alone, abs=1e-4)
    record = export(qwen_like / "rm", tmp_path / "adapter", adapter_only=True)  # over a base config without a pad id
    assert record["max_difference_relative_to_1_plus_largest_abs_logit"] <= 1e-5


def test_eval_stage_scores_do_not_depend_on_the_batch(qwen_like, tmp_path):
    """Greedy answers are the same whatever the batch; their scores must be too. In float32: under
    bfloat16 autocast another batch shape may round a score to the next bfloat16 step (1e-3 here)."""
    common = (
        "stage=eval",
        "hardware.training_args.bf16=false",
        "model=custom",
        f"model.name_or_path={qwen_like / 'model'}",
        "dataset.test_size=8",
        "dataset.max_samples=64",
        f"eval.policy={qwen_like / 'sft'}",
        f"eval.reward_model={qwen_like / 'rm'}",
        "eval.num_prompts=8",
        "eval.temperature=0",
        "eval.max_new_tokens=16",
    )
    rows = {}
    for size in (1, 8):
        train(tmp_path / str(size), *common, f"eval.batch_size={size}")
        rows[size] = [json.loads(line) for line in (tmp_path / str(size) / "samples.jsonl").read_text().splitlines()]
    compared = [(one, eight) for one, eight in zip(rows[1], rows[8]) if one["policy"] == eight["policy"]]
    lengths = {len(one["policy"]) + len(json.dumps(one["prompt"])) for one, _ in compared}
    assert len(compared) >= 4 and len(lengths) > 1  # rows of several lengths: the shorter ones were padded
    for one, eight in compared:
        assert eight["score_policy"] == pytest.approx(one["score_policy"], abs=1e-4)


def test_samples_follow_the_tempered_softmax_whatever_the_checkpoint_says():
    """1500 first tokens at temperature 3 from a policy whose generation_config asks for top_k=2,
    a repetition penalty and min_p: their distribution is softmax(logits / 3)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.generation import encode_prompts, sample
    from rlhf.settings import SamplingSettings
    from rlhf.tiny_model import ensure_tiny_model

    path = ensure_tiny_model()
    tokenizer, policy = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    policy.generation_config.top_k, policy.generation_config.repetition_penalty, policy.generation_config.min_p = 2, 1.5, 0.1
    prompt = [{"role": "user", "content": "请写一句关于天气的话。"}]
    norm = policy.model.norm.weight.detach().clone()
    # Sharper logits, so that 1500 samples estimate the distribution closely, but not so sharp that
    # two tokens hold it all: the sharpest scale (the tiny model's weights differ by build) at which
    # the top two tokens hold < 0.88, so top_k=2 would be off by > 0.12 in total variation.
    for sharpening in (5.0, 4.5, 4.0, 3.5):
        with torch.no_grad():
            policy.model.norm.weight.copy_(norm * sharpening)
            logits = policy(**encode_prompts(tokenizer, [prompt], 128, torch.device("cpu"))).logits[0, -1]
        expected = torch.softmax(logits.double() / 3, dim=-1)
        if expected.topk(2).values.sum() < 0.88:
            break
    assert expected.topk(2).values.sum() < 0.88  # top_k=2 would be far off
    noise = 0.5 * (2 * expected * (1 - expected) / (torch.pi * 1500)).sqrt().sum()  # the expected TV of 1500 honest draws
    assert noise < 0.06

    torch.manual_seed(0)
    drawn = sample(policy, tokenizer, [prompt] * 1500, SamplingSettings(128, 1, 3.0, 1.0), torch.device("cpu")).responses[:, 0]
    observed = torch.bincount(drawn, minlength=expected.numel()).double() / len(drawn)
    assert 0.5 * (observed - expected).abs().sum() < 0.08
    assert policy.generation_config.top_k == 2  # the checkpoint's own settings are left as they were


@pytest.mark.slow
def test_lora_bias_is_refused_where_the_reference_is_the_disabled_adapter():
    done = cli("stage=dpo", "peft.bias=all")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: peft.bias=all with stage=dpo") and "Traceback" not in done.stderr


def test_held_out_scores_are_paired_draws(qwen_like):
    """Scoring the same prompts under the same seed twice gives the same scores (a policy that did
    not change has gain 0 exactly); the draws leave the caller's random state alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf.generation import held_out_scores
    from rlhf.metrics import paired_gain
    from rlhf.settings import SamplingSettings

    reward = reward_model_as_ppo_loads_it(qwen_like / "rm", "model=custom", f"model.name_or_path={qwen_like / 'model'}")
    policy = AutoModelForCausalLM.from_pretrained(qwen_like / "model")
    tokenizer = AutoTokenizer.from_pretrained(qwen_like / "model")
    prompts = [[{"role": "user", "content": f"第{i}个问题：今天做什么？"}] for i in range(6)]

    def scores():
        settings = SamplingSettings(64, 12, 1.0, 1.0)
        return held_out_scores(policy, tokenizer, reward, prompts, settings, torch.device("cpu"), 4, seed=7)

    state = torch.get_rng_state()
    (before, lengths, no_kl), (after, lengths_again, _) = scores(), scores()
    assert no_kl == []  # not asked for
    assert torch.equal(torch.get_rng_state(), state)
    assert before == after and len(set(before)) > 1 and lengths == lengths_again and all(1 <= n <= 12 for n in lengths)
    gain = paired_gain(before, after)
    assert gain["eval_score_gain"] == 0 and gain["eval_score_gain_ci95"] == [0, 0]


def test_paired_gain_by_hand():
    from rlhf.metrics import paired_gain

    before, after = [1.0, 2.0, 3.0, 4.0], [1.5, 2.0, 4.0, 4.5]  # differences 0.5, 0, 1, 0.5
    gain = paired_gain(before, after)
    # mean 0.5, sample sd sqrt(0.5 / 3), t(0.975, 3) = 3.182446 (published tables)
    half = 3.182446 * (0.5 / 3) ** 0.5 / 2
    assert gain["eval_score_gain"] == pytest.approx(0.5)
    assert gain["eval_score_gain_ci95"] == pytest.approx([0.5 - half, 0.5 + half], abs=1e-5)
    assert gain["eval_scores_before"] == 2.5 and gain["eval_scores"] == 3.0


@pytest.mark.parametrize("df, table", [(1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423), (120, 1.9799)])
def test_t_quantiles_match_published_tables(df, table):
    from rlhf.metrics import t_quantile

    assert t_quantile(0.975, df) == pytest.approx(table, abs=1e-4)


def test_wilson_interval_by_hand():
    from rlhf.metrics import wilson_interval

    # 8 of 10: centre (0.8 + 1.96^2 / 20) / (1 + 1.96^2 / 10), published [0.4902, 0.9433]
    assert wilson_interval(8, 10) == pytest.approx([0.4902, 0.9433], abs=1e-4)


def test_rlhf_chain_reports_a_paired_held_out_gain(rlhf_chain):
    run_dir, _ = rlhf_chain
    metrics = json.loads((run_dir / "ppo" / "metrics.json").read_text())
    low, high = metrics["eval_score_gain_ci95"]
    assert low <= metrics["eval_score_gain"] <= high
    assert metrics["eval_score_gain"] == pytest.approx(metrics["eval_scores"] - metrics["eval_scores_before"])
    assert low > 0  # the tiny model's PPO gain is a gain
    low, high = metrics["eval_score_gain_lc_ci95"]  # and what of it is not answer length, with the mean length change
    assert low <= metrics["eval_score_gain_lc"] <= high and "eval_length_change_ci95" in metrics
    assert metrics["objective/kl_coef_final"] > 0  # where the KL controller left kl_coef
    # The held-out answers' KL: the estimator and temperature of objective/kl (on other prompts), so of its size
    logged = [json.loads(line)["objective/kl"] for line in (run_dir / "ppo" / "history.jsonl").read_text().splitlines()][-5:]
    assert 0.33 < metrics["eval_kl"] / (sum(logged) / len(logged)) < 3, (metrics["eval_kl"], logged)


def test_a_gain_that_is_only_longer_answers_is_no_length_controlled_gain():
    """A hand-built policy whose answers only grow longer at equal quality, scored by a reward
    model that favours length: the raw gain is real, the gain at equal length is not. Checked
    against least squares by hand: (X'X)^-1 X'y, its covariance s^2 (X'X)^-1 with s^2 = SSE / (n - 2),
    and t(0.975, 38) = 2.024394 from published tables."""
    import random

    from rlhf.metrics import length_controlled_gain, paired_gain

    generator = random.Random(0)
    n = 40
    quality = [generator.gauss(0, 1) for _ in range(n)]  # the same answer quality before and after
    lengths_before = [generator.randint(10, 60) for _ in range(n)]
    lengths_after = [length + generator.randint(5, 40) for length in lengths_before]  # answers only grow

    def score(q: float, length: int) -> float:  # the proxy's length bias, and its noise
        return q + 0.03 * length + generator.gauss(0, 0.3)

    before = [score(q, length) for q, length in zip(quality, lengths_before)]
    after = [score(q, length) for q, length in zip(quality, lengths_after)]
    gain = paired_gain(before, after, lengths=(lengths_before, lengths_after))
    assert gain["eval_score_gain_ci95"][0] > 0  # a "gain" whose interval is above 0
    low, high = gain["eval_score_gain_lc_ci95"]
    assert low < 0 < high  # none of it at equal length
    assert gain["eval_length_change"] > 5 and gain["eval_length_change_ci95"][0] > 0

    x = torch.tensor([float(b - a) for a, b in zip(lengths_before, lengths_after)], dtype=torch.float64)
    y = torch.tensor([b - a for a, b in zip(before, after)], dtype=torch.float64)
    design = torch.stack([torch.ones(n, dtype=torch.float64), x], dim=1)
    inverse = torch.linalg.inv(design.T @ design)
    intercept, slope = (inverse @ design.T @ y).tolist()
    residual = float(((y - design @ torch.tensor([intercept, slope], dtype=torch.float64)) ** 2).sum()) / (n - 2)
    half = 2.024394 * (residual * float(inverse[0, 0])) ** 0.5
    assert gain["eval_score_gain_lc"] == pytest.approx(intercept, abs=1e-9)
    assert gain["eval_score_per_token"] == pytest.approx(slope, abs=1e-9)
    assert gain["eval_score_gain_lc_ci95"] == pytest.approx([intercept - half, intercept + half], abs=1e-5)
    unchanged = length_controlled_gain(before, after, lengths_before, lengths_before)  # no length changed: all of it counts
    assert unchanged["eval_score_gain_lc"] == pytest.approx(gain["eval_score_gain"]) and unchanged["eval_length_change"] == 0


@pytest.mark.slow
def test_reward_inputs_longer_than_the_rm_was_trained_on_are_cut_from_the_left(tmp_path, capfd):
    """PPO over prompts of ~1600 tokens (fitted to its max_prompt_length of 500) scores with a reward
    model trained at max_length 256: every (prompt, response) row is cut to its last 256 tokens (the
    response kept), counted, unwarned."""
    from conftest import train

    long_prompt = "今天天气很好，我们去公园散步吧。" * 110  # ~1600 tokens of the tiny model's tokenizer
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{i}. {long_prompt}", "input": "", "output": "好的。"}) + "\n" for i in range(16)))
    train(tmp_path / "rm", "stage=rm", "rm.max_steps=2", "rm.max_length=256")
    reward = reward_model_as_ppo_loads_it(tmp_path / "rm")
    prompt, response = [{"role": "user", "content": long_prompt}], "好的，我们走吧。"
    text = reward.tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)
    ids = reward.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 1500 and reward.max_length == 256
    with torch.no_grad():  # by hand: the row's last 256 tokens, alone (no padding), through the classifier
        expected = reward.model(input_ids=torch.tensor([ids[-256:]])).logits[0, 0].item()
    assert reward.scores([prompt], [response], torch.device("cpu")).item() == pytest.approx(expected, abs=1e-5)
    capfd.readouterr()

    metrics = train(
        tmp_path / "ppo",
        "stage=ppo",
        f"ppo.reward_model={tmp_path / 'rm'}",
        "dataset=builtin_sft",
        f"dataset.path={data}",
        "dataset.test_size=0.25",
        *ONE_SMALL_PPO_UPDATE,
        "ppo.max_prompt_length=500",  # within the policy's 512 tokens, beyond the reward model's 256
    )
    output = "".join(capfd.readouterr())
    assert "longer than the specified maximum sequence length" not in output
    assert metrics["data/reward_cut_inputs"] == 8 + 4 + 4  # one update's 8 answers, the 4 held-out answers before and after

    metrics = train(  # GRPO scores its training answers through TRL: cut the same way
        tmp_path / "grpo",
        "stage=grpo",
        f"grpo.reward_model={tmp_path / 'rm'}",
        "dataset=builtin_sft",
        f"dataset.path={data}",
        "dataset.test_size=0.25",
        "grpo.max_steps=1",
        "grpo.per_device_train_batch_size=4",
        "grpo.gradient_accumulation_steps=1",
        "grpo.num_generations=2",
        "grpo.max_prompt_length=500",  # within the policy's 512 tokens, beyond the reward model's 256
        "grpo.max_completion_length=8",
        "grpo.eval_prompts=4",
    )
    output = "".join(capfd.readouterr())
    assert "longer than the specified maximum sequence length" not in output
    assert metrics["data/reward_cut_inputs"] == 4 + 4 + 4  # one step's 4 answers, the 4 held-out answers before and after


@pytest.fixture(scope="module")
def eos_padded(tmp_path_factory):
    """A copy of the tiny model set up as models shipped without a pad token are (Llama-3, `</s>`
    models): the tokenizer pads with its EOS, and the chat template ends an answer with EOS; an RM
    trained on it."""
    root = tmp_path_factory.mktemp("eos_padded")
    model = tiny_copy_without_a_pad_id(root / "model")
    tokenizer_config = json.loads((model / "tokenizer_config.json").read_text())
    tokenizer_config["pad_token"] = None  # none: a missing key would get the tokenizer class's default
    (model / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    template = (model / "chat_template.jinja").read_text()
    assert "{% endgeneration %}{{- '\\n' }}" in template
    (model / "chat_template.jinja").write_text(template.replace("{% endgeneration %}{{- '\\n' }}", "{% endgeneration %}"))
    base = ("model=custom", f"model.name_or_path={model}", "dataset.test_size=8", "dataset.max_samples=64")
    float32 = "hardware.training_args.bf16=false"  # on any CPU: the RM merged exactly, its scores compared to 1e-5
    train(root / "rm", "stage=rm", *base, float32, "rm.max_steps=2", "rm.eval_strategy=no", "rm.save_strategy=no", "rm.max_length=256")
    return root


def test_reward_model_scores_where_it_trained_when_the_tokenizer_pads_with_eos(eos_padded):
    """RM training calls the classifier, which reads its score at the last token that is not the pad
    id: with pad = EOS and a template ending in EOS, the token before that EOS. PPO, GRPO, RLOO and
    eval score through RewardModel.scores, which must read the same position (it read the EOS)."""

    overrides = ("model=custom", f"model.name_or_path={eos_padded / 'model'}", "hardware.training_args.bf16=false")
    reward = reward_model_as_ppo_loads_it(eos_padded / "rm", *overrides)
    tokenizer, model = reward.tokenizer, reward.model
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == model.config.pad_token_id
    prompts, responses = [SHORT, LONG], ["好的。", "我最喜欢秋天，因为天气凉爽，树叶变成金黄色，而且空气很清新。"]
    scored = reward.scores(prompts, responses, torch.device("cpu"))  # batched: the short row is padded with EOS
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=False)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        assert ids[0, -1] == tokenizer.eos_token_id  # the template ends the answer with EOS
        with torch.no_grad():
            per_position = model.score(model.model(input_ids=ids).last_hidden_state)[0, :, 0]
            as_trained = model(input_ids=ids).logits[0, 0]  # the classifier's own pooling, as TRL's RewardTrainer calls it
        assert as_trained.item() == pytest.approx(per_position[-2].item(), abs=1e-5)  # the token before EOS
        assert (per_position[-1] - per_position[-2]).abs() > 1e-3  # reading the EOS instead would differ
        assert scored[i].item() == pytest.approx(per_position[-2].item(), abs=1e-4)


def test_sampling_stops_at_every_eos_id_the_model_declares():
    """A checkpoint may declare several EOS ids in generation_config (Qwen: <|im_end|> and
    <|endoftext|>); a response ends at the first of any of them, as TRL's samplers end it."""
    from omegaconf import OmegaConf

    from rlhf.generation import sample
    from rlhf.models import load_model, load_tokenizer
    from rlhf.settings import SamplingSettings
    from rlhf.tiny_model import ensure_tiny_model

    path = str(ensure_tiny_model())
    model_cfg = OmegaConf.create({"trust_remote_code": False, "name_or_path": path})
    tokenizer = load_tokenizer(path, model_cfg)
    model = load_model(path, model_cfg, None, OmegaConf.create({"dtype": "float32"})).eval()
    settings, device = SamplingSettings(max_new_tokens=24, temperature=0), torch.device("cpu")  # greedy: the same tokens again
    prompt = [[{"role": "user", "content": "请介绍一下秋天。"}]]
    free = sample(model, tokenizer, prompt, settings, device)
    tokens = free.responses[0][free.response_mask[0].bool()].tolist()
    stops = [k for k in range(2, len(tokens)) if tokens[k] != tokenizer.eos_token_id and tokens[k] not in tokens[:k]]
    assert stops, f"the greedy answer {tokens} has no token to declare as a second EOS"
    k = stops[0]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokens[k]]
    stopped = sample(model, tokenizer, prompt, settings, device)
    assert int(stopped.response_mask[0].sum()) == k + 1 and bool(stopped.ended_with_eos[0])
    assert stopped.texts[0] == tokenizer.decode(tokens[: k + 1], skip_special_tokens=True)
