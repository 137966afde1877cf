"""Sampling responses and measuring them (log-probs, KL): shared by PPO's rollouts, `stage=eval`
and the held-out scores of the online stages; the reward models that score them are in
rlhf/reward_model.py.

Prompts are lists of chat messages; responses are the tokens after the prompt up to and
including the first EOS.

Two rules keep the numbers computed from samples honest (a third, where a reward model reads its
score, is in rlhf/reward_model.py):
- Sample from what you score. `generate` fills every option the caller leaves unset from the
  checkpoint's generation_config.json (Qwen3: top_k=20; Qwen2.5-Instruct: a repetition penalty)
  and then from transformers' defaults (top_k=50). PPO's policy gradient, its KL penalty and
  eval's KL are computed from log-probs of the plain tempered softmax, so sampling passes one
  explicit configuration and hides the checkpoint's (`explicit_generation`).
- Stop where the model stops. A checkpoint may declare several end-of-turn ids in its
  generation_config (Qwen: `<|im_end|>` and `<|endoftext|>`); sampling stops at any of them and
  the tokenizer's EOS (`stop_ids`), and a response ends at the first.
"""

import contextlib
import dataclasses
from dataclasses import dataclass

import torch

from rlhf.compat import float32_forward, transformers_model
from rlhf.settings import SamplingSettings


@dataclass
class Samples:
    sequences: torch.Tensor  # prompt (left-padded) + response (right-padded), [B, P + R]
    attention_mask: torch.Tensor  # 1 on real prompt and response tokens
    response_mask: torch.Tensor  # 1 on response tokens up to and including EOS, [B, R]
    texts: list  # the decoded responses
    ended_with_eos: torch.Tensor  # False where the response hit max_new_tokens before EOS, [B]

    def select(self, index: torch.Tensor) -> "Samples":
        """The rows at `index` (a mini-batch)."""
        return Samples(
            self.sequences[index],
            self.attention_mask[index],
            self.response_mask[index],
            [self.texts[i] for i in index.tolist()],
            self.ended_with_eos[index],
        )

    @property
    def prompt_length(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_length :]


def prompt_ids(tokenizer, messages: list) -> list:
    """The token ids of a chat-templated prompt (generation prompt included), however long: a
    prompt longer than the model's limit is cut by the caller, so the tokenizer's warning that it
    is too long would be noise."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int, device) -> dict:
    """Chat-templated prompts, left-padded (generation appends on the right). A prompt longer than
    max_prompt_length is refused, not cut: a cut here would start mid-message while the reward
    model scores the prompt whole; callers fit their prompts first (`fit_prompts`) and score those."""
    ids = [prompt_ids(tokenizer, messages) for messages in prompts]
    width = max(len(row) for row in ids)
    if width > max_prompt_length:
        raise ValueError(f"a prompt of {width} templated tokens exceeds max_prompt_length={max_prompt_length}: fit_prompts first")
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}


def fit_prompt(messages: list, tokenizer, max_tokens: int) -> list:
    """`messages` cut to at most `max_tokens` chat-templated tokens (generation prompt included)
    the way a long conversation is cut for the model: the oldest turns go first, the kept part
    starts at a user turn, and a last turn still too long keeps its end. A leading system message
    stays unless it alone leaves no room. A prompt that fits is returned as it is."""
    from rlhf.errors import UserError

    def length(conversation: list) -> int:
        return len(prompt_ids(tokenizer, conversation))

    if length(messages) <= max_tokens:
        return messages
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    for head in (system, []) if system else ([],):
        turns = list(messages[len(system) :])
        while len(turns) > 1 and (length(head + turns) > max_tokens or turns[0].get("role") != "user"):
            turns = turns[1:]
        ids = tokenizer(turns[-1]["content"], add_special_tokens=False, verbose=False)["input_ids"]  # cut below
        while ids and length(head + turns) > max_tokens:  # decoding and encoding again may not meet exactly: until it fits
            ids = ids[min(len(ids), max(1, length(head + turns) - max_tokens)) :]
            turns[-1] = {**turns[-1], "content": tokenizer.decode(ids)}
        if length(head + turns) <= max_tokens:
            return head + turns
    raise UserError(f"a prompt limit of {max_tokens} tokens leaves no room: the chat template alone takes {length(turns)}")


def fit_prompts(prompts: list, tokenizer, max_tokens: int, key: str) -> tuple[list, int]:
    """(`prompts`, each cut by `fit_prompt` to `max_tokens` templated tokens; how many were cut).
    The policy then samples from the conversation the reward model scores: `encode_prompts` used
    to cut a long prompt's first tokens, mid-message (the system turn and the template's header
    with them), while the reward model still read it whole. `key` names the
    setting in the one-line error when even the template does not fit."""
    from rlhf.errors import UserError

    try:
        fitted = [fit_prompt(prompt, tokenizer, max_tokens) for prompt in prompts]
    except UserError as err:
        raise UserError(f"{key}={max_tokens}: {err}") from None
    return fitted, sum(new is not old for new, old in zip(fitted, prompts))  # fit_prompt returns a prompt that fits as it is


def fitted_prompts(data, tokenizer, max_tokens: int, key: str) -> tuple:
    """(the splits `data` (rlhf.data.Splits, not imported: sampling needs no dataset code) with
    every prompt fitted by `fit_prompts`, how many were cut): training and held-out prompts alike."""
    cut = 0

    def fitted(split):
        nonlocal cut
        if split is None:
            return None
        # list(...) once: the column hands out new objects on every pass, and the count compares identities
        prompts, cut_here = fit_prompts(list(split["prompt"]), tokenizer, max_tokens, key)
        cut += cut_here
        return split.map(lambda row, index: {"prompt": prompts[index]}, with_indices=True)

    return dataclasses.replace(data, train=fitted(data.train), eval=fitted(data.eval)), cut


def generation_config(settings: SamplingSettings, tokenizer, stop: list | None = None, **library_sampler):
    """Every option that shapes the distribution, set explicitly: the softmax of logits /
    temperature (top_p where asked; temperature 0 = greedy), no top-k, no repetition penalty;
    generation ends at any id in `stop` (default: the tokenizer's EOS).
    `library_sampler` mirrors another sampler's options (TRL's top_k, min_p, repetition_penalty)
    where the samples only need to match that sampler, not log-probs."""
    from transformers import GenerationConfig

    eos = stop or [tokenizer.eos_token_id]
    ids = {"eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id, "max_new_tokens": settings.max_new_tokens}
    if settings.temperature <= 0:
        return GenerationConfig(do_sample=False, **ids)
    options = {"top_k": 0, "repetition_penalty": 1.0, **{key: value for key, value in library_sampler.items() if value is not None}}
    return GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, **options, **ids)


def stop_ids(model, tokenizer) -> list:
    """Every id that ends a response: the tokenizer's EOS and each EOS id the checkpoint's
    generation_config declares (one id or a list)."""
    declared = getattr(transformers_model(model).generation_config, "eos_token_id", None)
    declared = declared if isinstance(declared, (list, tuple)) else [declared]
    return sorted({tokenizer.eos_token_id, *declared} - {None})


@contextlib.contextmanager
def explicit_generation(model):
    """For the block, `model.generate` knows no checkpoint defaults: the transformers model under
    any peft or DDP wrapper gets an empty generation config, so only the caller's options and
    transformers' global defaults (which `generation_config` overrides) apply."""
    from transformers import GenerationConfig

    inner = transformers_model(model)
    own = inner.generation_config
    inner.generation_config = GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = own


@contextlib.contextmanager
def seeded(seed: int, device):
    """Random draws in the block start from `seed` and leave the surrounding random state as it
    was: the same prompts sampled under the same seed before and after training draw the same
    random numbers (common random numbers), so the two scores are paired."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample(model, tokenizer, prompts: list, settings: SamplingSettings, device, **library_sampler) -> Samples:
    """One response per prompt; temperature 0 means greedy decoding."""
    encoded = encode_prompts(tokenizer, prompts, settings.max_prompt_length, device)
    stop = stop_ids(model, tokenizer)  # read before explicit_generation hides the checkpoint's config
    with explicit_generation(model):
        sequences = model.generate(**encoded, generation_config=generation_config(settings, tokenizer, stop, **library_sampler))
    responses = sequences[:, encoded["input_ids"].shape[1] :]
    response_mask = up_to_first_eos(responses, stop)
    texts = [tokenizer.decode(row[mask.bool()], skip_special_tokens=True) for row, mask in zip(responses, response_mask)]
    attention_mask = torch.cat([encoded["attention_mask"], response_mask.long()], dim=1)
    ended_with_eos = torch.isin(responses, torch.tensor(stop, device=responses.device)).any(dim=1)
    return Samples(sequences, attention_mask, response_mask, texts, ended_with_eos)


def up_to_first_eos(responses: torch.Tensor, eos_token_id: int | list) -> torch.Tensor:
    """1 on each response's tokens up to and including its first EOS (any of them, given a list), 0 after."""
    is_eos = torch.isin(responses, torch.tensor(eos_token_id, device=responses.device)).long()
    mask = ((is_eos.cumsum(dim=1) - is_eos) == 0).float()
    mask[:, 0] = 1.0  # a response has at least one token
    return mask


def response_outputs(model, samples: Samples, temperature: float, hidden: bool = False):
    """(logits, last hidden state or None) at the positions that predict the response tokens:
    position t-1 predicts token t. Logits are divided by the sampling temperature, so their
    log-probs are those of the distribution that was sampled from."""
    position_ids = (samples.attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding shifts positions
    output = model(
        input_ids=samples.sequences, attention_mask=samples.attention_mask, position_ids=position_ids, output_hidden_states=hidden
    )
    predicting = slice(samples.prompt_length - 1, samples.sequences.shape[1] - 1)
    logits = output.logits[:, predicting].float() / max(temperature, 1e-6)
    return logits, output.hidden_states[-1][:, predicting].float() if hidden else None


@torch.no_grad()
def response_logprobs(model, samples: Samples, temperature: float) -> torch.Tensor:
    logits, _ = response_outputs(model, samples, temperature)
    return logprobs_from_logits(logits, samples.responses)


def token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi - log ref at each sampled response token, 0 on padding ([B, R]). Summed over a
    response it is the project's one estimate of KL(policy || reference) of that response, in nats
    (the "k1" estimator: unbiased, because the tokens are the policy's own samples): PPO's penalty
    and `objective/kl`, its held-out `eval_kl` and stage=eval's `eval_kl` all take it, at the
    temperature the policy sampled its training answers at."""
    return torch.where(mask.bool(), logprobs - ref_logprobs, torch.zeros_like(logprobs))


@torch.no_grad()
def sampled_kl(policy, reference, samples: Samples, temperature: float) -> torch.Tensor:
    """KL(policy || reference) of each of the policy's sampled responses ([B], nats): `token_kl`
    summed, at `temperature`. In float32 even under bfloat16 autocast: the sum adds differences of
    nearly equal log-probs, which bfloat16's rounding swamps."""
    with float32_forward(policy):
        with as_reference(policy, reference) as ref, float32_forward(ref):
            ref_logprobs = response_logprobs(ref, samples, temperature)
        logprobs = response_logprobs(policy, samples, temperature)
    return token_kl(logprobs, ref_logprobs, samples.response_mask).sum(dim=1)


@torch.no_grad()
def held_out_scores(
    policy, tokenizer, reward, prompts: list, settings: SamplingSettings, device, batch_size: int, seed: int, **options
) -> tuple:
    """(`reward`'s score (an rlhf.reward_model.RewardModel) of one sampled response per prompt, each
    response's length in tokens, its KL where asked): the held-out prompts before and after training,
    `held_out_answers` scored `batch_size` at a time."""
    answers, lengths, kls = held_out_answers(policy, tokenizer, prompts, settings, device, batch_size, seed, **options)
    return reward.batched_scores(prompts, answers, device, batch_size), lengths, kls


@torch.no_grad()
def held_out_answers(
    policy,
    tokenizer,
    prompts: list,
    settings: SamplingSettings,
    device,
    batch_size: int,
    seed: int,
    measure_kl: bool = False,
    reference=None,
    **library_sampler,
) -> tuple:
    """(one sampled response per prompt, its length in tokens up to and including its EOS, and
    with `measure_kl` its KL to `reference` at the sampling temperature (`sampled_kl`; reference
    None = the peft policy with its adapter disabled), else []), without dropout. Batch k is
    sampled under seed + k * batch_size, so two calls on the same prompts and seed - before and
    after training - are paired draws."""
    training, answers, lengths, kls = policy.training, [], [], []
    policy.eval()
    for start in range(0, len(prompts), batch_size):
        with seeded(seed + start, device):
            drawn = sample(policy, tokenizer, prompts[start : start + batch_size], settings, device, **library_sampler)
        answers += drawn.texts
        lengths += drawn.response_mask.sum(dim=1).int().tolist()
        if measure_kl:
            kls += sampled_kl(policy, reference, drawn, settings.temperature).tolist()
    policy.train(training)
    return answers, lengths, kls


@contextlib.contextmanager
def as_reference(policy, reference=None):
    """The reference model to call: a separate frozen one, or else the (peft) policy with its
    adapter disabled - the starting policy, with no second copy in memory."""
    if reference is not None:
        yield reference
        return
    with policy.disable_adapter():
        yield policy


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Upcast half/bf16 to float32; leave float32 and float64 as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position: [..., vocab] and [...] -> [...].

    Computed as logit[token] - logsumexp(logits), which never materialises the full
    log-softmax. At least float32: a bf16 logsumexp over a large vocabulary is off in the second
    or third digit, which biases the PPO ratio.
    """
    logits = at_least_float32(logits)
    chosen = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: [..., vocab] -> [...].

    H = -sum p log p, and log p = z - logsumexp(z), so H = logsumexp(z) - sum p z: no log of a
    tiny probability is taken, and logsumexp and softmax are both stable for large logits.
    """
    logits = at_least_float32(logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)
