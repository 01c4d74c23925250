"""The checks a model folder passes before the pipeline takes it (``use``): nothing corrupt, nothing hostile.

:func:`check_model_input` reads only the config, the index and the shard headers (no weights):

* the config is a JSON object, its (text) ``model_type`` is in the targets table
  (:mod:`abliterate.targets`; else one line listing the supported types), and an ``auto_map``
  (remote code) is refused unless transformers itself knows the model type, since this tool never
  runs a model's own code;
* the index names only plain ``*.safetensors`` file names inside the folder
  (:func:`abliterate.model.modelio.weight_map`), every one of them present;
* every shard header is valid (:func:`abliterate.formats.safetensors_io.read_header`: JSON, offsets
  inside the file, begin <= end, no overlap, byte sizes that fit dtype and shape);
* no tensor is stored in two shards, and every tensor the index names is in its shard.
"""

from __future__ import annotations

from pathlib import Path

from abliterate.errors import fail


def check_config(folder: Path) -> dict:
    """The folder's config.json as a dict, checked for a supported architecture and no unknown remote code."""
    import json

    from abliterate.model.modelio import text_config
    from abliterate.targets import ARCHITECTURES, find_architecture

    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        fail(f"{path} is not a readable JSON file ({type(exc).__name__}); re-download the model")
    if not isinstance(config, dict):
        fail(f"{path} is not a JSON object; re-download the model")
    text = text_config(config)
    model_type = text.get("model_type") if isinstance(text, dict) else None
    if not isinstance(model_type, str):
        fail(f"{path} has no model_type; is this a Hugging Face transformers model folder?")
    if "auto_map" in config or (isinstance(text, dict) and "auto_map" in text):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if config.get("model_type") not in CONFIG_MAPPING_NAMES or model_type not in CONFIG_MAPPING_NAMES:
            fail(f"{path} maps to remote code (auto_map) for model type {model_type[:40]!r}, which transformers "
                 "does not know; this tool never runs a model's own code: use a checkpoint of a supported type")
    if find_architecture(text) is None:
        known = ", ".join(t for arch in ARCHITECTURES for t in arch.model_types)
        fail(f"{path}: model type {model_type[:40]!r} is not supported (supported: {known}); "
             "see abliterate/targets.py to add it")
    return config


def check_weights(folder: Path) -> dict[str, str]:
    """The folder's tensor -> shard map, after checking the index and every shard header."""
    from abliterate.formats.safetensors_io import read_header
    from abliterate.model.modelio import INDEX_NAME, weight_map

    folder = Path(folder)
    names = weight_map(folder)  # plain shard names only
    where: dict[str, str] = {}
    headers = {}
    for file in sorted(set(names.values())):
        if not (folder / file).is_file():
            fail(f"{folder / INDEX_NAME} lists the shard {file}, which is missing or not a file; re-download the model")
        headers[file] = read_header(folder / file)
        for name in headers[file].tensors:
            if name in where:
                fail(f"tensor {name} is stored in two shards, {where[name]} and {file}; re-download the model")
            where[name] = file
    for name, file in sorted(names.items()):
        if name not in headers[file].tensors:
            fail(f"{folder / INDEX_NAME} puts tensor {name} in {file}, whose header does not hold it; "
                 "re-download the model")
    return names


def check_model_input(folder: str | Path) -> dict[str, str]:
    """Every check above on a model folder; returns its tensor -> shard map."""
    from abliterate.model.modelio import check_model_dir

    folder = check_model_dir(folder)
    check_config(folder)
    return check_weights(folder)
