"""Reward functions for the online stages (`stage=grpo`, `stage=rloo`), chosen by config:

    grpo:
      reward_functions:
        answer:                       # any name; TRL logs rewards/<function name>/mean
          _target_: rlhf.rewards.AnswerMatch
          column: answer
          weight: 1.0

TRL calls each function with the batch's prompts and completions (conversational: a list of
messages each) and every other column of the dataset as a keyword argument, and sums the
rewards with the functions' weights (and the reward model's, when `reward_model` is set).
A function returns one float per completion, or None where it has nothing to say.
"""

import re


def completion_text(completion) -> str:
    """The text of one completion, conversational ([{"role": "assistant", "content": ...}]) or plain."""
    if isinstance(completion, list):
        return "".join(str(turn.get("content", "")) for turn in completion if isinstance(turn, dict))
    return str(completion)


class RewardFunction:
    """What TRL's GRPOTrainer and RLOOTrainer call: `__name__` names it in the logs, `weight`
    scales it in the sum of rewards."""

    name = "reward"

    def __init__(self, weight: float = 1.0):
        self.weight = float(weight)
        self.__name__ = self.name

    def __call__(self, prompts, completions, **columns) -> list:
        return [self.score(completion_text(completion), index, columns) for index, completion in enumerate(completions)]

    def score(self, text: str, index: int, columns: dict):
        raise NotImplementedError


class LengthPenalty(RewardFunction):
    """-per_char for every character beyond max_chars (0 within it): a cap on verbosity, the
    usual way a learned reward model is over-optimised."""

    name = "length_penalty"

    def __init__(self, max_chars: int = 400, per_char: float = 0.01, weight: float = 1.0):
        super().__init__(weight)
        self.max_chars, self.per_char = max_chars, per_char

    def score(self, text: str, index: int, columns: dict) -> float:
        return -self.per_char * max(0, len(text) - self.max_chars)


NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class AnswerMatch(RewardFunction):
    """A verifiable reward: 1 when the last number in the completion equals the row's `column`
    (a number, as in the built-in arithmetic prompts), else 0; None for a row without one."""

    name = "answer_match"

    def __init__(self, column: str = "answer", weight: float = 1.0):
        super().__init__(weight)
        self.column = column

    def score(self, text: str, index: int, columns: dict):
        if self.column not in columns:
            raise KeyError(f"reward function answer_match reads the dataset column '{self.column}', which the data does not have")
        expected = columns[self.column][index]
        if expected is None or str(expected).strip() == "":
            return None
        found = NUMBER.findall(text)
        return float(bool(found) and float(found[-1]) == float(expected))
