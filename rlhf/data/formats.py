"""Dataset formats: each turns one row of a published shape into what a stage trains on.

Three record kinds come out, in TRL's conversational form so that the model's chat template is
applied by the trainer:
- "sft":        {"prompt": [messages], "completion": [assistant message]}
- "preference": {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}
- "prompt":     {"prompt": [messages], "answer": str}: prompts with a reference answer for a
                verifiable reward (rlhf.rewards.AnswerMatch); serves only stages that sample.
Every kind serves a stage that needs prompts alone (PPO, GRPO, RLOO); the columns besides the
answers (`answer`) go with the prompts, for reward functions to read.

A converter raises `RowError` with the reason when a row is unusable; the loader adds the
file and line, and either stops or (dataset.skip_invalid) counts and skips the row.
"""

import re
from collections.abc import Callable
from dataclasses import dataclass


class RowError(ValueError):
    """One row cannot be used; the message says why (missing field, wrong type, empty text)."""


@dataclass(frozen=True)
class Format:
    kind: str  # "sft", "preference" or "prompt": which stages can train on it
    convert: Callable[[dict], dict]  # one raw row -> one normalised record
    fields: str  # the fields it reads, for error messages and the README


# ---- checked access to fields -------------------------------------------------------------


def field(row, name: str):
    """row[name], or a RowError when the row is not an object or the field is missing/null."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise RowError(f"field '{name}' is missing")
    if row[name] is None:
        raise RowError(f"field '{name}' is null")
    return row[name]


def text(value, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise RowError(f"field '{name}' should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{name}' is empty")
    return value


def text_field(row, name: str, allow_empty: bool = False) -> str:
    return text(field(row, name), name, allow_empty)


def message(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def messages_field(row, name: str) -> list:
    """A list of {role, content} messages with known roles and non-empty text."""
    value = field(row, name)
    if not isinstance(value, list) or not value:
        raise RowError(f"field '{name}' should be a non-empty list of messages")
    checked = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        role = text(field(item, "role"), f"{where}.role") if isinstance(item, dict) else None
        if role not in ("system", "user", "assistant"):
            raise RowError(f"field '{where}' should be a message with role system/user/assistant")
        checked.append(message(role, text(field(item, "content"), f"{where}.content")))
    return checked


def last_assistant_turn(conversation: list, name: str) -> tuple:
    """(the messages before it, the final assistant message) of a whole conversation."""
    if conversation[-1]["role"] != "assistant":
        raise RowError(f"field '{name}' should end with an assistant message")
    if len(conversation) < 2:
        raise RowError(f"field '{name}' has no prompt before the assistant message")
    return conversation[:-1], conversation[-1]


def preference_record(prompt: list, chosen: str, rejected: str) -> dict:
    if chosen.strip() == rejected.strip():  # a conversion mistake: DPO's loss would sit at log 2, an RM learns nothing
        raise RowError("the chosen and rejected answers are identical")
    return {"prompt": prompt, "chosen": [message("assistant", chosen)], "rejected": [message("assistant", rejected)]}


# ---- the formats --------------------------------------------------------------------------


def instruction_output(row) -> dict:
    """BELLE / alpaca: `instruction`, optional `input` (joined below the instruction), `output`."""
    instruction = text_field(row, "instruction")
    extra = text_field(row, "input", allow_empty=True) if row.get("input") is not None else ""
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    return {"prompt": [message("user", prompt)], "completion": [message("assistant", text_field(row, "output"))]}


def prompt_field(row) -> list:
    """`prompt` as a string (one user turn) or, as TRL's conversational rows have it, a list of
    messages ending with the user's turn."""
    if isinstance(row.get("prompt") if isinstance(row, dict) else None, list):
        prompt = messages_field(row, "prompt")
        if prompt[-1]["role"] != "user":
            raise RowError("field 'prompt' should end with the user's turn")
        return prompt
    return [message("user", text_field(row, "prompt"))]


def answer_field(row, name: str) -> str:
    """An answer as a string or, as TRL's conversational rows have it, a list holding one
    assistant message."""
    value = field(row, name)
    if isinstance(value, list):
        turns = messages_field(row, name)
        if len(turns) != 1 or turns[0]["role"] != "assistant":
            raise RowError(f"field '{name}' should be a string or a list of one assistant message")
        return turns[0]["content"]
    return text(value, name)


def prompt_chosen_rejected(row) -> dict:
    """Preference pairs: `prompt`, `chosen`, `rejected`, as strings or in TRL's conversational
    form (`prompt` a list of messages, each answer a list of one assistant message)."""
    return preference_record(prompt_field(row), answer_field(row, "chosen"), answer_field(row, "rejected"))


def prompt_completion(row) -> dict:
    """Instruction data in TRL's prompt-completion shape: `prompt` and `completion`, as strings
    or conversational (a list of messages, and a list of one assistant message)."""
    return {"prompt": prompt_field(row), "completion": [message("assistant", answer_field(row, "completion"))]}


def conversation(row) -> dict:
    """Instruction data in TRL's conversational language-modelling shape: `messages`, a whole
    conversation; the model learns its last (assistant) message from the ones before."""
    prompt, answer = last_assistant_turn(messages_field(row, "messages"), "messages")
    return {"prompt": prompt, "completion": [answer]}


def ultrafeedback_binarized(row) -> dict:
    """HuggingFaceH4/ultrafeedback_binarized: `chosen`/`rejected` are whole conversations
    (lists of {role, content}) sharing every message but the final assistant reply."""
    chosen_prompt, chosen = last_assistant_turn(messages_field(row, "chosen"), "chosen")
    rejected_prompt, rejected = last_assistant_turn(messages_field(row, "rejected"), "rejected")
    if chosen_prompt != rejected_prompt:
        raise RowError("fields 'chosen' and 'rejected' differ before the final assistant reply")
    return preference_record(chosen_prompt, chosen["content"], rejected["content"])


def ultrafeedback_argilla(row) -> dict:
    """argilla/ultrafeedback-binarized-preferences: `instruction`, `chosen_response`, `rejected_response`."""
    prompt = [message("user", text_field(row, "instruction"))]
    return preference_record(prompt, text_field(row, "chosen_response"), text_field(row, "rejected_response"))


def stack_exchange_paired(row) -> dict:
    """lvwerra/stack-exchange-paired: `question`; `response_j` is preferred over `response_k`."""
    prompt = [message("user", text_field(row, "question"))]
    return preference_record(prompt, text_field(row, "response_j"), text_field(row, "response_k"))


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_dialogue(dialogue: str, name: str) -> list:
    """Split "\\n\\nHuman: ...\\n\\nAssistant: ..." into user/assistant messages."""
    parts = HH_TURN.split(dialogue)
    if len(parts) < 3 or parts[0].strip():
        raise RowError(f"field '{name}' is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' dialogue")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [message(roles[speaker], said.strip()) for speaker, said in zip(parts[1::2], parts[2::2])]


def hh_rlhf(row) -> dict:
    """Anthropic/hh-rlhf: `chosen` and `rejected` are whole dialogues that share every turn but
    the last assistant reply; the shared turns become the prompt."""
    chosen_prompt, chosen = last_assistant_turn(hh_dialogue(text_field(row, "chosen"), "chosen"), "chosen")
    rejected_prompt, rejected = last_assistant_turn(hh_dialogue(text_field(row, "rejected"), "rejected"), "rejected")
    if chosen_prompt != rejected_prompt:
        raise RowError("fields 'chosen' and 'rejected' differ before the last assistant reply")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply["content"]:
            raise RowError(f"field '{name}' ends with an empty assistant reply")
    return preference_record(chosen_prompt, chosen["content"], rejected["content"])


def hh_rlhf_chosen(row) -> dict:
    """Anthropic/hh-rlhf as instruction data: the dialogue before the last turn, and the
    preferred (chosen) reply to it."""
    pair = hh_rlhf(row)
    return {"prompt": pair["prompt"], "completion": pair["chosen"]}


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def sharegpt_answer(row, name: str) -> str:
    """`chosen`/`rejected` as {from, value} (LLaMA-Factory) or as a plain string (MedicalGPT)."""
    value = field(row, name)
    if isinstance(value, dict):
        if SHAREGPT_ROLES.get(value.get("from")) != "assistant":
            raise RowError(f"field '{name}.from' should be 'gpt' or 'assistant'")
        return text(field(value, "value"), f"{name}.value")
    return text(value, name)


def sharegpt_preference(row) -> dict:
    """LLaMA-Factory / MedicalGPT preference data: `conversations` (list of {from, value})
    ending with the user's turn, plus `chosen` and `rejected` answers."""
    turns = field(row, "conversations")
    if not isinstance(turns, list) or not turns:
        raise RowError("field 'conversations' should be a non-empty list of {from, value}")
    prompt = []
    for index, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(field(turn, "from")) if isinstance(turn, dict) else None
        if role is None:
            raise RowError(f"field 'conversations[{index}].from' should be one of {', '.join(SHAREGPT_ROLES)}")
        prompt.append(message(role, text(field(turn, "value"), f"conversations[{index}].value")))
    if prompt[-1]["role"] != "user":
        raise RowError("field 'conversations' should end with the user's turn")
    return preference_record(prompt, sharegpt_answer(row, "chosen"), sharegpt_answer(row, "rejected"))


def prompt_answer(row) -> dict:
    """Prompts with a reference answer: `prompt` and `answer`, strings (a number is read as its text)."""
    answer = field(row, "answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    return {"prompt": [message("user", text_field(row, "prompt"))], "answer": text(answer, "answer")}


FORMATS = {
    "belle": Format("sft", instruction_output, "instruction, input, output (JSON Lines)"),
    "alpaca": Format("sft", instruction_output, "instruction, input, output (JSON array)"),
    "prompt_completion": Format("sft", prompt_completion, "prompt, completion (strings or message lists)"),
    "messages": Format("sft", conversation, "messages (a conversation ending with the assistant's reply)"),
    "preference": Format("preference", prompt_chosen_rejected, "prompt, chosen, rejected (strings or message lists)"),
    "ultrafeedback_binarized": Format("preference", ultrafeedback_binarized, "chosen, rejected (message lists)"),
    "ultrafeedback_argilla": Format("preference", ultrafeedback_argilla, "instruction, chosen_response, rejected_response"),
    "stack_exchange_paired": Format("preference", stack_exchange_paired, "question, response_j, response_k"),
    "hh_rlhf": Format("preference", hh_rlhf, "chosen, rejected (Human/Assistant dialogues)"),
    "hh_rlhf_chosen": Format("sft", hh_rlhf_chosen, "chosen, rejected (Human/Assistant dialogues; trains on the chosen reply)"),
    "sharegpt_preference": Format("preference", sharegpt_preference, "conversations, chosen, rejected"),
    "prompt_answer": Format("prompt", prompt_answer, "prompt, answer"),
}
