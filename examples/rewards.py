"""Reward functions for `llmcli finetune --objective grpo`, in TRL's signature (they work with TRL's
GRPOTrainer unchanged). With the sums in examples/sums.jsonl:

    llmcli finetune -d examples/sums.jsonl --objective grpo \
        --reward examples/rewards.py:answer_format --reward examples/rewards.py:correct_answer \
        --reward-weights 0.2 --reward-weights 1.0

Each record there has a `prompt` (chat messages) and the `answer`:
    {"prompt": [{"role": "user", "content": "What is 6 + 27? End your reply with 'Answer: N'."}], "answer": 33}

How llmcli (and TRL) call a reward function:
- `completions`: the model's completions, one per sample. A string when the prompt is a string; a list
  with one message, [{"role": "assistant", "content": "..."}], when the prompt is a list of chat messages.
- `prompts`, `completion_ids` (token ids of each completion): also passed, by name.
- every other field of the records, by name, as a list with one value per completion: here `answer`.
  Each prompt is sampled several times (--num-generations), so its record's values repeat.
- `**kwargs` takes whatever else comes (`trainer_state`, `log_metric`, the fields you do not use).
Return one float per completion, or None where the reward does not apply (it is then left out of the
total rather than counted as 0).
"""

import re

# "Answer: 42", "answer: -3.5", "Answer: 1,234.": what the prompt asks the model to end with
ANSWER = re.compile(r"Answer:\s*(-?[\d,]*\.?\d+)\.?\s*$", re.IGNORECASE)


def text_of(completion):
    """The completion's text, whether it is a string or a chat message list."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def answer_format(completions, **kwargs):
    """1.0 when the completion ends with "Answer: <number>", else 0.0: teaches the format first."""
    return [1.0 if ANSWER.search(text_of(c).strip()) else 0.0 for c in completions]


def correct_answer(completions, answer, **kwargs):
    """1.0 when the number after "Answer:" equals the record's `answer`, 0.0 when it differs or is missing;
    None for a record whose answer is null (nothing to check it against)."""
    rewards = []
    for completion, expected in zip(completions, answer):
        if expected is None:
            rewards.append(None)
            continue
        match = ANSWER.search(text_of(completion).strip())
        given = float(match.group(1).replace(",", "")) if match else None
        rewards.append(1.0 if given is not None and abs(given - float(expected)) < 1e-6 else 0.0)
    return rewards
