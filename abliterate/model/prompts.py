"""Prompt sets: loading them from files or datasets, and rendering them with a chat template.

Supported sources:
  * ``.txt``: one prompt per line;
  * ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv``: a ``text`` or ``prompt`` column
    (``.json`` may also be a plain list of strings);
  * ``hf:NAME[:split][:column]``: a Hugging Face dataset, for users with network access.

Blank prompts and exact duplicates are dropped (first occurrence kept, order kept); an empty set
is an error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from abliterate.errors import fail
from abliterate.hashing import sha256_text

TEXT_COLUMNS = ("text", "prompt")


def load_prompts(spec: str | Path) -> list[str]:
    """Read a prompt set; raise :class:`UserError` if it is missing, unreadable or empty."""
    spec = str(spec)
    if spec.startswith("hf:"):
        raw = _load_hf(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            fail(f"prompt file {path} does not exist; create it or point the option at an existing file")
        try:
            raw = _load_file(path)
        except UnicodeDecodeError:
            fail(f"prompt file {path} is not UTF-8 text; re-save it as UTF-8")
        except (ValueError, KeyError, OSError) as exc:
            fail(f"prompt file {path} could not be read ({exc}); check its format")
    prompts = _clean(raw)
    if not prompts:
        fail(f"prompt set {spec} is empty; it needs at least one non-blank prompt")
    return prompts


def _clean(raw: list[Any]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for item in raw:
        if item is None:
            continue
        text = str(item).strip()
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _pick_column(columns: list[str], where: str) -> str:
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise ValueError(f"no 'text' or 'prompt' column in {where} (columns: {', '.join(columns) or 'none'})")


def _load_file(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    if suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [row if isinstance(row, str) else row[_pick_column(list(row), str(path))] for row in rows]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            data = data[_pick_column(list(data), str(path))]
        return [row if isinstance(row, str) else row[_pick_column(list(row), str(path))] for row in data]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        return table.column(_pick_column(table.column_names, str(path))).to_pylist()
    if suffix == ".csv":
        import csv

        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            column = _pick_column(list(reader.fieldnames or []), str(path))
            return [row[column] for row in reader]
    raise ValueError(f"unsupported extension {suffix!r} (use .txt, .jsonl, .json, .parquet or .csv)")


def _load_hf(spec: str) -> list[Any]:
    parts = spec[3:].split(":")
    name, split, column = parts[0], (parts[1] if len(parts) > 1 else "train"), (parts[2] if len(parts) > 2 else "")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        fail(f"prompt set {spec} needs the 'datasets' package: pip install datasets")
    try:
        data = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, missing dataset, bad split: all user-fixable
        fail(f"could not load dataset {name!r} split {split!r} ({type(exc).__name__}); check the name and your network")
    column = column or _pick_column(list(data.column_names), spec)
    if column not in data.column_names:
        fail(f"dataset {name!r} has no column {column!r} (columns: {', '.join(data.column_names)})")
    return list(data[column])


def prompts_hash(prompts: list[str]) -> str:
    """sha256 of the cleaned prompt list, independent of the file format it came from."""
    return sha256_text("\n".join(prompts))


def resolve_template(tokenizer, chat_template: str = "") -> str:
    """The chat template to render with: ``chat_template`` (a file path or a literal Jinja
    string) if given, else the tokenizer's own; a clear error if there is none."""
    if chat_template:
        path = Path(chat_template)
        if path.suffix in (".jinja", ".j2", ".txt") or path.is_file():
            if not path.is_file():
                fail(f"chat template file {path} does not exist")
            return path.read_text(encoding="utf-8")
        return chat_template
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: use the default one
        template = template.get("default") or next(iter(template.values()), None)
    if not template:
        fail(
            "the model's tokenizer has no chat template; set capture.chat-template in params.yaml "
            "to a Jinja template file (or pass --chat-template)"
        )
    return template


def template_hash(template: str) -> str:
    return sha256_text(template)


def render(tokenizer, prompts: list[str], system_prompt: str = "", chat_template: str = "") -> list[list[int]]:
    """Token ids of each prompt rendered as one user turn plus the generation prompt.

    The template already writes BOS where the model wants one, so the rendered text is
    tokenized with ``add_special_tokens=False`` (no double BOS).
    """
    template = resolve_template(tokenizer, chat_template)
    out: list[list[int]] = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out
