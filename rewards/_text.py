"""Completion text for both of TRL's formats: a plain string or a list of chat messages."""

from __future__ import annotations


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content blocks
            return "".join(block.get("text", "") for block in content if isinstance(block, dict))
        return content
    raise TypeError(f"a completion must be a string or a list of chat messages, got {type(completion).__name__}")
