"""``model.yaml``: the base model's weight shards and other files, which dvc.yaml's per-file stages loop over.

``shards`` maps a shard key (1-based, zero-padded to 5 digits: ``ablate@00001``) to a weight file;
``files`` maps a key (the name without extension, lower case, other characters as ``-``:
``carry@config``) to every other file the ablated copy keeps unchanged (config, generation
config, tokenizer files, chat template, remote code, the safetensors index). ``abliterate use``
writes it, keeping its header comment; ``plan`` reads the shard table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from abliterate.errors import fail
from abliterate.names import check_file_name, check_key

DEFAULT_HEADER = (
    "# Written by `abliterate use`: the base model's weight shards and the other files of its folder.\n"
    "# Keys name the per-shard stages (ablate@00001, carry@config). Do not edit by hand.\n"
)
CARRY_NAMES = {
    "config.json", "generation_config.json", "model.safetensors.index.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.json", "processor_config.json",
    "preprocessor_config.json", "video_preprocessor_config.json", "spiece.model",
}
CARRY_PATTERNS = (re.compile(r"^tokenizer.*"), re.compile(r".*\.(py|jinja|tiktoken)$"),
                  re.compile(r"^sentencepiece.*\.model$"), re.compile(r".*preprocessor_config\.json$"))
YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "y", "n", "~"}


def shard_table(files: list[str]) -> dict[str, str]:
    """Shard key -> file name, as stored in model.yaml: keys are 1-based, zero-padded to 5 digits."""
    return {f"{i:05d}": name for i, name in enumerate(sorted(files), start=1)}


def file_key(name: str) -> str:
    """model.yaml key of a carried file: name without extension, lower case, other chars as '-'."""
    if name == "model.safetensors.index.json":
        return "index"
    stem = name.rsplit(".", 1)[0] if "." in name.strip(".") else name
    return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-") or "file"


def carried_files(folder: Path) -> dict[str, str]:
    """key -> file name for every non-weight file of ``folder`` the ablated copy keeps unchanged."""
    names = sorted(
        p.name for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".")
        and (p.name in CARRY_NAMES or any(rx.match(p.name) for rx in CARRY_PATTERNS))
    )
    keys: dict[str, str] = {}
    # .json files claim the short key first (tokenizer.json -> tokenizer, tokenizer.model -> tokenizer-model)
    for name in sorted(names, key=lambda n: (not n.endswith(".json"), n)):
        check_file_name(name, folder)
        key = file_key(name)
        if key in keys:
            key = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "file"
        base, n = key, 2
        while key in keys:  # names that differ only in case or punctuation
            key, n = f"{base}-{n}", n + 1
        keys[key] = name
    return dict(sorted(keys.items()))


def check_tables(shards: dict[str, str], files: dict[str, str], where: str | Path) -> None:
    """Every key matches its pattern and every value is a plain file name (:mod:`abliterate.names`)."""
    for table, entries in (("shards", shards), ("files", files)):
        for key, name in entries.items():
            check_key(key, table, where)
            check_file_name(name, where)


def yaml_scalar(text: str) -> str:
    """``text`` as a YAML scalar: plain where that reads back the same, else double-quoted."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9._/-]*", text) and text.lower() not in YAML_WORDS:
        return text
    return json.dumps(text)


def render_model_yaml(shards: dict[str, str], files: dict[str, str], header: str = DEFAULT_HEADER) -> str:
    check_tables(shards, files, "model.yaml")
    lines = [header.rstrip("\n"), "shards:"]
    lines += [f"  {json.dumps(k)}: {yaml_scalar(v)}" for k, v in sorted(shards.items())]
    lines.append("files:" if files else "files: {}")
    lines += [f"  {yaml_scalar(k)}: {yaml_scalar(v)}" for k, v in sorted(files.items())]
    return "\n".join(lines) + "\n"


def model_yaml_header(path: Path) -> str:
    """The leading comment block of an existing model.yaml (or the default one)."""
    if not path.is_file():
        return DEFAULT_HEADER
    header = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    return "\n".join(header) + "\n" if header else DEFAULT_HEADER


def _read_table(path: str | Path, table: str) -> dict:
    import yaml

    try:
        found = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get(table)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as exc:
        fail(f"cannot read the {table} list in {path} ({type(exc).__name__}); run `abliterate use SOURCE` again")
    if not isinstance(found, dict) or (table == "shards" and not found):
        fail(f"{path} has no `{table}:` table; run `abliterate use SOURCE` again")
    return found


def read_shards(path: str | Path) -> dict[str, str]:
    """The ``shards`` table of model.yaml, checked; one line if the file is missing, unreadable or has none."""
    shards = _read_table(path, "shards")
    check_tables(shards, {}, path)
    return dict(shards)


def read_files(path: str | Path) -> dict[str, str]:
    """The ``files`` table of model.yaml (key -> carried file name), checked."""
    files = _read_table(path, "files")
    check_tables({}, files, path)
    return dict(files)


def check_model_yaml(model_dir: str | Path, model_yaml: str | Path) -> None:
    """Fail clearly if model.yaml's shard list no longer matches the model folder's weights."""
    from abliterate.model.modelio import shard_files

    listed = read_shards(model_yaml)
    actual = shard_table(shard_files(model_dir))
    if listed != actual:
        fail(f"{model_yaml} lists shards {sorted(listed.values())} but {model_dir} has {sorted(actual.values())}; "
             "run `abliterate use SOURCE` again (model.yaml is out of date)")
