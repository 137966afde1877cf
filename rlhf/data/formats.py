"""Dataset formats: each turns one row of a published shape into what a stage trains on.

Two record kinds come out, both in TRL's conversational form so the model's chat template
is applied by the trainer:
- "sft":        {"prompt": [user message], "completion": [assistant message]}
- "preference": {"prompt": [messages], "chosen": [assistant message], "rejected": [assistant message]}

A converter raises `RowError` with the reason when a row is unusable; the loader adds the
file and line.
"""

from dataclasses import dataclass
from typing import Callable


class RowError(ValueError):
    """One row cannot be used; the message says why (missing field, wrong type, empty text)."""


@dataclass(frozen=True)
class Format:
    kind: str  # "sft" or "preference": which stages can train on it
    convert: Callable[[dict], dict]  # one raw row -> one normalised record
    fields: str  # the fields it reads, for error messages and the README


def text_field(row: dict, name: str, allow_empty: bool = False) -> str:
    """row[name] as a string, or a RowError naming the field and what is wrong with it."""
    if not isinstance(row, dict):
        raise RowError(f"expected a JSON object, got {type(row).__name__}")
    if name not in row:
        raise RowError(f"field '{name}' is missing")
    value = row[name]
    if value is None:
        raise RowError(f"field '{name}' is null")
    if not isinstance(value, str):
        raise RowError(f"field '{name}' should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{name}' is empty")
    return value


def user(text: str) -> list:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list:
    return [{"role": "assistant", "content": text}]


def belle(row: dict) -> dict:
    """BELLE / alpaca: `instruction`, optional `input` (joined below the instruction), `output`."""
    instruction = text_field(row, "instruction")
    extra = text_field(row, "input", allow_empty=True) if row.get("input") is not None else ""
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    return {"prompt": user(prompt), "completion": assistant(text_field(row, "output"))}


def preference(row: dict) -> dict:
    """Plain preference pairs: `prompt`, `chosen`, `rejected`, each a string."""
    return {
        "prompt": user(text_field(row, "prompt")),
        "chosen": assistant(text_field(row, "chosen")),
        "rejected": assistant(text_field(row, "rejected")),
    }


FORMATS = {
    "belle": Format("sft", belle, "instruction, input, output"),
    "preference": Format("preference", preference, "prompt, chosen, rejected"),
}
