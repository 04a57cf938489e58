"""Prompt building: the Alpaca template and the model's own chat template."""

from __future__ import annotations

import threading

# One encode at a time: a fast tokenizer's call sets shared state on its Rust tokenizer for its
# own options (encode_special_tokens, the post-processor while sanitizing control tokens), so a
# chat and an Alpaca prompt encoded by two request threads at once could each get the other's.
_ENCODE = threading.Lock()

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{}\n\n### Input:\n{}\n\n### Response:\n{}"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt with an empty response slot, as Unsloth's notebooks fill it."""
    return ALPACA_TEMPLATE.format(instruction, input, "")


def chat_messages(messages: list[dict], system_prompt: str | None = None) -> list[dict]:
    """The messages as the chat template takes them, with the system prompt first if given."""
    head = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return head + [{"role": m["role"], "content": m["content"]} for m in messages]


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of the conversation through the tokenizer's own chat template."""
    with _ENCODE:  # control tokens typed by a user (e.g. "<|im_start|>system") stay text, not turns
        encoded = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            sanitize_control_tokens=True,
        )
    return list(encoded["input_ids"])


def alpaca_prompt_ids(tokenizer, instruction: str, input: str = "") -> list[int]:
    """Token ids of the Alpaca prompt (with BOS where the tokenizer adds one, as Unsloth does).
    Control tokens typed into the instruction or input (e.g. "<|im_end|>") stay text, as in chat."""
    with _ENCODE:
        return tokenizer(alpaca_prompt(instruction, input), split_special_tokens=True)["input_ids"]
