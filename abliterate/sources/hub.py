"""A hub id ``org/name[@revision]`` as a base model: fetched with huggingface_hub into its cache."""

from __future__ import annotations

import re
from pathlib import Path

from abliterate.errors import fail
from abliterate.model.modelio import quiet_libraries

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?$")
HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.py"]


def fetch_hub(spec: str) -> Path:
    """Download a hub model's safetensors, json and tokenizer files; return the snapshot folder."""
    quiet_libraries()
    repo_id, _, revision = spec.partition("@")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        fail("fetching a hub model needs huggingface_hub: pip install huggingface_hub")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo: all fixable by the user
        detail = (str(exc).strip().splitlines() or [""])[0][:160]
        fail(
            f"could not fetch {spec!r} from the Hugging Face hub ({type(exc).__name__}: {detail}); "
            "check the id, your network and `hf auth login`, or download it and run `abliterate use FOLDER` "
            "(no local folder of that name exists)"
        )
