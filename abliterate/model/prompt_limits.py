"""Limits on prompt sets: no prompt longer than the model's context or ``capture.max-prompt-tokens``,
and a loud warning for a set too small to give a stable direction.

A forward pass's memory grows with the square of its longest prompt (eager attention): one
100,000-character prompt made ``capture`` try to allocate 2.7 GB and die with a traceback. The
token count is checked right after the chat template is rendered, before any model is loaded or
run, and a prompt over the limit is named by its file and line (:func:`locate`).

A small set (fewer than :data:`MIN_PROMPTS`) still runs: tests, quick looks and hand-made sets are
legitimately small, but its difference of means is noisy (one prompt per set scored a quality of
0.65 where 326 prompts scored 0.10), so the stage warns on stderr instead of refusing.
"""

from __future__ import annotations

import json
from pathlib import Path

from abliterate.errors import fail
from abliterate.progress import PLAIN, Reporter

MIN_PROMPTS = 16
MAX_PROMPT_TOKENS = 4096  # capture.max-prompt-tokens' default


def token_limit(config: dict, max_prompt_tokens: int, new_tokens: int = 0) -> tuple[int, str]:
    """``(tokens, what sets it)``: the smaller of ``max_prompt_tokens`` and the model's context
    (``max_position_embeddings``) less the ``new_tokens`` generated after the prompt."""
    from abliterate.model.modelio import text_config

    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
        fail(f"capture.max-prompt-tokens must be a whole number of at least 1, got {max_prompt_tokens!r}")
    limit = (max_prompt_tokens, f"capture.max-prompt-tokens ({max_prompt_tokens})")
    context = text_config(config).get("max_position_embeddings")
    if isinstance(context, int) and context <= new_tokens:
        fail(f"{new_tokens} generated tokens do not fit the model's context of {context} tokens; "
             "lower evaluate.max-new-tokens")
    if isinstance(context, int) and 0 < context - new_tokens < limit[0]:
        less = f" less the {new_tokens} generated" if new_tokens else ""
        limit = (context - new_tokens, f"the model's context ({context} tokens{less})")
    return limit


def check_lengths(sequences: list[list[int]], texts: list[str], source: str, limit: tuple[int, str]) -> None:
    """Fail with one line naming the first prompt of ``source`` longer than ``limit``'s tokens."""
    tokens, what = limit
    for i, (ids, text) in enumerate(zip(sequences, texts)):
        if len(ids) > tokens:
            fail(f"{locate(source, text, i)}: this prompt is {len(ids)} tokens rendered, longer than {what}; "
                 "shorten or remove it (or raise capture.max-prompt-tokens, within the context)")


def render_checked(tokenizer, texts: list[str], source: str, limit: tuple[int, str], system_prompt: str = "",
                   chat_template: str = "") -> list[list[int]]:
    """:func:`abliterate.model.prompts.render`, then :func:`check_lengths`."""
    from abliterate.model.prompts import render

    sequences = render(tokenizer, texts, system_prompt=system_prompt, chat_template=chat_template)
    check_lengths(sequences, texts, source, limit)
    return sequences


def locate(source: str, text: str, index: int) -> str:
    """Where a prompt comes from: ``file:line`` for .txt and .jsonl (the first line holding it),
    else ``file (prompt N)`` (N counts the kept prompts, 1-based)."""
    path = Path(str(source))
    if path.suffix.lower() in (".txt", ".jsonl") and path.is_file():
        with path.open(encoding="utf-8", errors="replace") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip() == text or (path.suffix.lower() == ".jsonl" and _jsonl_holds(line, text)):
                    return f"{source}:{number}"
    return f"{source} (prompt {index + 1})"


def _jsonl_holds(line: str, text: str) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False
    values = [row] if isinstance(row, str) else list(row.values()) if isinstance(row, dict) else []
    return any(isinstance(v, str) and v.strip() == text for v in values)


def warn_small(texts: list[str], source: str, report: Reporter = PLAIN) -> None:
    """A loud warning on stderr when a set has fewer than :data:`MIN_PROMPTS` prompts."""
    if len(texts) < MIN_PROMPTS:
        report.message(f"warning: {source} has {len(texts)} prompt(s), fewer than {MIN_PROMPTS}: the "
                       "difference of means is noisy and the direction may be wrong; add prompts "
                       "(a few hundred per set is typical)")
