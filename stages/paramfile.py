"""``--params params.yaml``: a stage's options filled from their params keys, never through a shell.

DVC pastes ``${...}`` values into a shell command line before any stage can check them, so a
system prompt with an apostrophe broke ``capture`` and ``batch-size: "1; touch X"`` ran ``touch``.
The commands in ``dvc.yaml`` therefore hold only fixed text and the keys ``abliterate use``
generates (``ablate@00001``, ``carry@config``); each command reads its values itself, through the
option ``--params FILE``, with the mapping option -> params key declared here (:data:`STAGES`).

Options given on the command line still win over the file (click's ``default_map``), so running a
stage by hand with a few options keeps working. Every value is checked before the command starts:
its type (as the option declares it), finite floats, the ranges of :data:`RANGES`, and no unknown
key in a section the stage reads (a typo such as ``ablate.scael`` is named, with the nearest
known key). ``dvc.yaml``'s ``params:`` still list the keys each stage reads, so DVC reruns exactly
the stages whose keys changed (``tests/test_layout.py`` checks both lists agree).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any

from abliterate.errors import fail

# stage module -> {python parameter name of the option: "section.key" in params.yaml}
STAGES: dict[str, dict[str, str]] = {
    "stages.base": {
        "source": "model.source", "max_shard_size": "model.max-shard-size", "demo_seed": "demo.seed",
        "demo_examples": "demo.examples", "demo_epochs": "demo.epochs", "demo_learning_rate": "demo.learning-rate",
        "demo_batch_size": "demo.batch-size", "demo_answer_tokens": "demo.answer-tokens", "demo_gated": "demo.gated",
        "demo_harmful_share": "demo.harmful-share",
        "demo_opening_tokens": "demo.opening-tokens", "demo_opening_weight": "demo.opening-weight",
    },
    "stages.capture": {
        "batch_size": "capture.batch-size", "dtype": "capture.dtype", "device": "capture.device",
        "streaming": "capture.streaming", "positions": "capture.positions",
        "system_prompt": "capture.system-prompt", "chat_template": "capture.chat-template",
        "max_prompt_tokens": "capture.max-prompt-tokens", "shared_prefix": "capture.shared-prefix",
    },
    "stages.reduce": {"winsorize": "reduce.winsorize", "orthogonalize": "reduce.orthogonalize"},
    "stages.score": {"min_depth": "score.min-depth", "max_depth": "score.max-depth"},
    "stages.search": {
        "trials": "search.trials", "seed": "search.seed", "kl_budget": "search.kl-budget",
        "validation": "search.validation", "proxy_tokens": "search.proxy-tokens",
        "confirm_prompts": "search.confirm-prompts", "confirm_tokens": "search.confirm-tokens",
        "confirm_top": "search.confirm-top", "startup_trials": "search.startup-trials",
        "batch_size": "search.batch-size", "dtype": "search.dtype", "device": "search.device",
        "threads": "search.threads", "norm_preserve": "ablate.norm-preserve", "projected": "ablate.projected",
        "sparsity": "ablate.sparsity", "targets": "ablate.targets", "auto_fraction": "ablate.auto-fraction",
        "measurement": "ablate.measurement", "scale": "ablate.scale",
        "system_prompt": "capture.system-prompt", "chat_template": "capture.chat-template",
        "max_prompt_tokens": "capture.max-prompt-tokens",
    },
    "stages.plan": {
        "layers": "ablate.layers", "measurement": "ablate.measurement", "scale": "ablate.scale",
        "norm_preserve": "ablate.norm-preserve", "projected": "ablate.projected", "sparsity": "ablate.sparsity",
        "targets": "ablate.targets", "auto_fraction": "ablate.auto-fraction",
        "quantized_edits": "ablate.quantized-edits",
    },
    "stages.baseline": {
        "max_new_tokens": "evaluate.max-new-tokens", "kl_tokens": "evaluate.kl-tokens",
        "batch_size": "evaluate.batch-size", "dtype": "evaluate.dtype", "device": "evaluate.device",
        "streaming": "evaluate.streaming", "system_prompt": "capture.system-prompt",
        "chat_template": "capture.chat-template", "max_prompt_tokens": "capture.max-prompt-tokens",
    },
    "stages.evaluate": {
        "batch_size": "evaluate.batch-size", "dtype": "evaluate.dtype", "device": "evaluate.device",
        "streaming": "evaluate.streaming",
    },
}
# keys read another way: plan's --overrides-from points at this list (no command line can hold it)
OTHER_KEYS = {"ablate.overrides": "stages.plan"}
# closed ranges beyond the type; the same ranges are written in params.yaml's comments
RANGES: dict[str, tuple[float, float]] = {"ablate.scale": (-10.0, 10.0)}


def known_keys() -> dict[str, set[str]]:
    """section -> every key of that section some stage reads."""
    known: dict[str, set[str]] = {}
    for dotted in [*(k for mapping in STAGES.values() for k in mapping.values()), *OTHER_KEYS]:
        section, _, key = dotted.partition(".")
        known.setdefault(section, set()).add(key)
    return known


def stage_sections(stage: str) -> set[str]:
    """The params.yaml sections a stage reads (its unknown keys are refused)."""
    keys = [*STAGES.get(stage, {}).values(), *(k for k, s in OTHER_KEYS.items() if s == stage)]
    return {k.partition(".")[0] for k in keys}


def read_params(path: str | Path) -> dict:
    """params.yaml as a mapping of sections; one line if it is missing or not YAML."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        fail(f"cannot read {path} ({exc.strerror or type(exc).__name__}); --params names the pipeline's params.yaml")
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        fail(f"{path} is not valid YAML{line} ({type(exc).__name__}); fix it")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        fail(f"{path} must be a mapping of sections (model:, capture:, ...) holding keys; fix it")
    return data


def unknown_key_violations(data: dict, sections: set[str] | None = None) -> list[str]:
    """One message per key of ``data`` that no stage reads (in ``sections``; None: every section)."""
    known = known_keys()
    dotted_known = sorted(f"{s}.{k}" for s, keys in known.items() for k in keys)
    found = []
    for section in sorted(data):
        if sections is not None and section not in sections:
            continue
        if section not in known:
            near = difflib.get_close_matches(str(section), sorted(known), n=1)
            found.append(f"unknown section {section!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
            continue
        for key in sorted(map(str, data[section])):
            if key not in known[section]:
                near = difflib.get_close_matches(f"{section}.{key}", dotted_known, n=1, cutoff=0.6)
                found.append(f"unknown key {section}.{key}" + (f" (did you mean {near[0]}?)" if near else ""))
    return found


def check_known(data: dict, path: str | Path, sections: set[str] | None = None) -> None:
    """Fail with one line naming the first unknown key (and the nearest known one)."""
    found = unknown_key_violations(data, sections)
    if found:
        fail(f"{path}: {found[0]}; fix the key (a misspelt key would be ignored)")


def check_value(key: str, value: Any, path: str | Path) -> None:
    """Finite floats, and the declared range of ``key``."""
    if isinstance(value, float) and not math.isfinite(value):
        fail(f"{path}: {key} is {value}; it must be a finite number")
    if key in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = RANGES[key]
        if not low <= value <= high:
            fail(f"{path}: {key} = {value:g} is outside [{low:g}, {high:g}]; see its comment in params.yaml")


def stage_values(stage: str, path: str | Path) -> dict[str, Any]:
    """``{option parameter name: value}`` of ``stage`` from the params file ``path``, checked: no
    unknown key in the sections it reads, every key present, no null, finite, in range."""
    data = read_params(path)
    check_known(data, path, stage_sections(stage))
    values = {}
    for name, dotted in STAGES[stage].items():
        section, _, key = dotted.partition(".")
        if key not in data.get(section, {}):
            fail(f"{path} has no key {dotted}; add it back (the project's params.yaml lists every key with its range)")
        value = data[section][key]
        if value is None or isinstance(value, (list, dict)):
            fail(f"{path}: {dotted} must be a single value, got {value!r}; write \"\" for an empty string")
        check_value(dotted, value, path)
        values[name] = value
    return values


def split_params_option(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--params FILE`` (or ``--params=FILE``), and FILE (None when absent)."""
    rest, found, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--params" and i + 1 < len(argv):
            found, i = argv[i + 1], i + 2
            continue
        if arg.startswith("--params="):
            found = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return rest, found


def default_map(app, argv: list[str], stage: str | dict[str, str] | None) -> tuple[list, dict]:
    """``argv`` without ``--params FILE``, and click's ``default_map`` of the command's options from
    FILE, each value checked against its option's type here so that the message names the key."""
    import inspect
    import typing

    rest, path = split_params_option(argv)
    name = None
    if isinstance(stage, dict):  # a group: the command named first takes the options
        name = next((a for a in rest if not a.startswith("-")), None)
        stage = stage.get(name)
    function = next((c.callback for c in app.registered_commands if name is None or c.name == name), None)
    if path is None or stage not in STAGES or function is None:
        fail("--params FILE fills the options of a pipeline stage (base, capture, reduce, score, search, plan, "
             "baseline, evaluate) from params.yaml; this command takes its options on the command line")
    values = stage_values(stage, path)
    hints = typing.get_type_hints(function)
    names = set(inspect.signature(function).parameters)
    for option, value in values.items():
        key = STAGES[stage][option]
        if option not in names:
            fail(f"{stage} has no option for {key} (stages/paramfile.py names --{option.replace('_', '-')})")
        values[option] = _typed(value, hints[option], f"{path}: {key}")
    return rest, ({name: values} if name is not None else values)


def _typed(value, annotation, where: str):
    """``value`` (as YAML read it) for an option of type ``annotation``: whole numbers for int,
    numbers for float, any scalar as text for str and paths; one line otherwise."""
    import typing

    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = kinds[0]
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(f"{where} = {value!r} is not a whole number; fix it")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail(f"{where} = {value!r} is not a number; fix it")
        return float(value)
    if isinstance(value, bool):  # YAML's true/false, read back by parse_bool
        return "true" if value else "false"
    return str(value)


def add_help(app, stage: str | dict[str, str] | None) -> None:
    """Say in each stage command's ``--help`` which options ``--params FILE`` fills, from which keys."""
    stages = stage if isinstance(stage, dict) else {None: stage}
    for command in app.registered_commands:
        mapping = STAGES.get(stages.get(command.name if isinstance(stage, dict) else None) or "")
        if mapping and command.epilog is None:
            pairs = ", ".join(f"--{o.replace('_', '-')} ({k})" for o, k in mapping.items())
            command.epilog = (f"--params FILE (dvc.yaml passes params.yaml) fills these options from its keys; "
                              f"an option given here wins: {pairs}")
