"""The layout's rules, read from the source: the library under thin stage commands, code deps that
cannot drift from the imports, and one source for each default.

Each rule is a function that returns its violations, run once on the real tree (no violation) and
once on a deliberately broken case (the violation is found), so a rule that cannot fail would show.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from code_graph import REPO, Graph

LIBRARY_MUST_NOT_IMPORT = ("typer", "rich", "click", "dvc", "stages")
# the library function each stage command calls with its options, as keywords of the same names
LIBRARY = {"stages.capture": "abliterate.model.capture:capture", "stages.search": "abliterate.search:run_search",
           "stages.plan": "abliterate.planning:plan", "stages.baseline": "abliterate.baseline:build_baseline",
           "stages.evaluate": "abliterate.evaluation:evaluate", "stages.score": "abliterate.scoring:pick_best"}


def layout_violations(graph: Graph) -> list[str]:
    """Import cycles, a stage module importing another, a library module importing the CLI side,
    and package ``__init__`` files that import anything (their imports would hide from the deps)."""
    found = [f"import cycle: {' -> '.join(cycle)}" for cycle in graph.cycles()]
    stages = set(graph.stage_modules())
    for name in sorted(stages):
        found += [f"stage {name} imports stage {other}" for other in sorted(graph.imports[name] & stages)]
    for name in graph.library_modules():
        bad = (graph.external(name) | {m.split(".")[0] for m in graph.imports[name]}) & set(LIBRARY_MUST_NOT_IMPORT)
        found += [f"library module {name} imports {b}" for b in sorted(bad)]
    for name, path in graph.files.items():
        if path.name == "__init__.py" and graph.statements(name):
            found.append(f"package {name} imports something in its __init__")
    return found


def dvc_stages(doc: dict) -> dict[str, dict]:
    """Every stage definition of a dvc.yaml document (a ``foreach`` stage by its ``do`` block)."""
    return {name: stage.get("do", stage) for name, stage in doc["stages"].items()}


def stage_module(stage: dict) -> str | None:
    found = re.search(r"python -m (stages\.\w+)", stage["cmd"])
    return found.group(1) if found else None


def deps_violations(doc: dict, graph: Graph) -> list[str]:
    """Each stage's code deps must be exactly the files its stage module runs."""
    found = []
    for name, stage in dvc_stages(doc).items():
        module = stage_module(stage)
        listed = {d for d in stage.get("deps", []) if isinstance(d, str) and d.split("/")[0] in ("abliterate", "stages")}
        if module is None:
            found += [f"{name}: runs no project module but lists {d}" for d in sorted(listed)]
            continue
        needed = set(graph.stage_files(module))
        found += [f"{name}: runs {f} but does not list it in its deps" for f in sorted(needed - listed)]
        found += [f"{name}: lists {f} in its deps but does not run it" for f in sorted(listed - needed)]
    return found


def _same(default, value) -> bool:
    if isinstance(value, bool):
        from stages.cliutil import parse_bool

        return default is not None and parse_bool(default) == value
    if isinstance(value, (int, float)):
        try:
            return float(default) == float(value)
        except (TypeError, ValueError):
            return False
    return str(default) == str(value)


def default_violations(doc: dict, params: dict) -> list[str]:
    """Every command option that ``--params`` fills from a params key (stages/paramfile.py) has that
    key's value as its default (or none: a required option, which the key always fills), and so has
    the same-named keyword of the library function the command calls."""
    import importlib
    import inspect

    import typer

    from stages.paramfile import STAGES

    found = []
    for name, stage in dvc_stages(doc).items():
        module = stage_module(stage)
        if module not in STAGES:
            continue
        command = typer.main.get_command(importlib.import_module(module).app)
        defaults = {p.name: p.default for p in command.params if not p.required}
        required = {p.name for p in command.params if p.required}
        signature = None
        if module in LIBRARY:
            where, _, function = LIBRARY[module].partition(":")
            signature = inspect.signature(getattr(importlib.import_module(where), function))
        for option, key in STAGES[module].items():
            group, _, field = key.partition(".")
            if group not in params or field not in params[group]:
                found.append(f"{name}: --{option.replace('_', '-')} reads {key}, which params.yaml lacks")
                continue
            value = params[group][field]
            keyword = signature.parameters.get(option) if signature is not None else None
            if (keyword is not None and keyword.default is not inspect.Parameter.empty
                    and not _same(keyword.default, value)):
                found.append(f"{name}: {LIBRARY[module]}({keyword.name}=) defaults to {keyword.default!r}, "
                             f"params.yaml {key} is {value!r}")
            flag = f"--{option.replace('_', '-')}"
            if option in required:
                continue
            if option not in defaults:
                found.append(f"{name}: {module} has no option {flag}")
            elif not _same(defaults[option], value):
                found.append(f"{name}: {flag} defaults to {defaults[option]!r}, params.yaml {key} is {value!r}")
    return found


def command_violations(doc: dict) -> list[str]:
    """No command pastes a value into the shell: a ``cmd`` holds only fixed text, ``${item}`` of a
    foreach over a literal list, and ``${key}`` of a foreach over model.yaml's tables (keys that
    ``abliterate use`` checks against a strict pattern); a stage with params reads them with
    ``--params params.yaml``."""
    from stages.paramfile import STAGES

    found = []
    for name, raw in doc["stages"].items():
        stage = raw.get("do", raw)
        literal = isinstance(raw.get("foreach"), list)
        for var in re.findall(r"\$\{([^}]*)\}", stage["cmd"]):
            if not (var == "key" and "foreach" in raw and not literal) and not (var == "item" and literal):
                found.append(f"{name}: its command pastes ${{{var}}} into the shell")
        if stage_module(stage) in STAGES and "--params params.yaml" not in stage["cmd"]:
            found.append(f"{name}: {stage_module(stage)} reads params but its command lacks --params params.yaml")
    return found


def params_violations(doc: dict) -> list[str]:
    """Each stage's ``params:`` in dvc.yaml cover exactly the keys its command reads, so that
    editing a key reruns exactly the stages that read it."""
    from stages.paramfile import OTHER_KEYS, STAGES

    found = []
    for name, stage in dvc_stages(doc).items():
        module = stage_module(stage)
        read = set(STAGES.get(module, {}).values()) | {k for k, m in OTHER_KEYS.items() if m == module}
        listed = {p for p in stage.get("params", []) if isinstance(p, str)}
        covered = {k for k in read if k in listed or k.partition(".")[0] in listed}
        found += [f"{name}: reads {k} but dvc.yaml does not list it in its params" for k in sorted(read - covered)]
        found += [f"{name}: lists {p} in its params but reads none of it" for p in sorted(listed)
                  if not any(k == p or k.partition(".")[0] == p for k in read)]
    return found


def options_violations(params: dict) -> list[str]:
    """The library's ablation options default to params.yaml's ``ablate`` values."""
    from abliterate.records import AblationOptions

    defaults = AblationOptions()
    found = []
    for field in ("norm-preserve", "projected", "sparsity"):
        ours = getattr(defaults, field.replace("-", "_"))
        if ours != params["ablate"][field]:
            found.append(f"AblationOptions.{field} is {ours!r}, params.yaml ablate.{field} is {params['ablate'][field]!r}")
    if ",".join(defaults.targets) != params["ablate"]["targets"]:
        found.append(f"AblationOptions.targets is {defaults.targets}, params.yaml has {params['ablate']['targets']!r}")
    return found


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / name).read_text(encoding="utf-8"))


# --- the real tree -----------------------------------------------------------------------------


def test_the_tree_keeps_the_layout_rules():
    assert layout_violations(Graph()) == []


def test_every_stage_lists_exactly_the_code_it_runs():
    assert deps_violations(_load("dvc.yaml"), Graph()) == []


def test_every_default_comes_from_params_yaml():
    params = _load("params.yaml")
    assert default_violations(_load("dvc.yaml"), params) == []
    assert options_violations(params) == []


def test_no_command_pastes_a_value_and_every_stage_lists_the_params_it_reads():
    from stages.paramfile import unknown_key_violations

    doc = _load("dvc.yaml")
    assert command_violations(doc) == []
    assert params_violations(doc) == []
    assert unknown_key_violations(_load("params.yaml")) == []  # every key of params.yaml is read by a stage


def test_the_demo_build_does_not_depend_on_the_ablation_or_evaluation_code():
    """The demo build (``base``) is minutes of tuning: unrelated library changes must not rerun it."""
    files = set(Graph().stage_files("stages.base"))
    unrelated = {"abliterate/edits.py", "abliterate/planning.py", "abliterate/shard_edit.py", "abliterate/kl.py",
                 "abliterate/evaluation.py", "abliterate/formats/plans.py", "abliterate/model/study.py"}
    assert files & unrelated == set()


# --- the rules catch what they are for ------------------------------------------------------------


def _tree(root: Path, files: dict[str, str]) -> Graph:
    for name, text in {"abliterate/__init__.py": "", "stages/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return Graph(root)


def test_layout_rules_find_cycles_stage_imports_and_cli_code_in_the_library(tmp_path):
    graph = _tree(tmp_path, {
        "abliterate/a.py": "def f():\n    from abliterate import b\n",  # an import inside a function counts
        "abliterate/b.py": "from abliterate.a import f\nimport rich\n",
        "abliterate/c.py": "from stages.cliutil import fail\n",
        "stages/cliutil.py": "",
        "stages/one.py": "from stages.cliutil import fail\n",
        "stages/two.py": "def main():\n    from stages.one import main\n",
        "abliterate/sub/__init__.py": "from abliterate import a\n",
    })
    assert sorted(layout_violations(graph)) == sorted([
        "import cycle: abliterate.a -> abliterate.b",
        "stage stages.two imports stage stages.one",
        "library module abliterate.b imports rich",
        "library module abliterate.c imports stages",
        "package abliterate.sub imports something in its __init__",
    ])


def test_deps_rule_finds_a_missing_and_a_stale_dependency():
    doc = _load("dvc.yaml")
    capture = doc["stages"]["capture"]["do"]
    capture["deps"].remove("abliterate/model/prompts.py")  # chat-template rendering, as the issue found it
    capture["deps"].append("abliterate/kl.py")
    assert deps_violations(doc, Graph()) == [
        "capture: runs abliterate/model/prompts.py but does not list it in its deps",
        "capture: lists abliterate/kl.py in its deps but does not run it",
    ]


def test_defaults_rule_finds_an_option_that_disagrees_with_params_yaml():
    params = _load("params.yaml")
    params["ablate"]["projected"] = False  # what the plan and search commands defaulted to before
    params["capture"]["batch-size"] = 7
    violations = default_violations(_load("dvc.yaml"), params)
    assert {v.split(":")[0] for v in violations if "--projected" in v} == {"plan", "search"}
    assert [v for v in violations if "--batch-size" in v and v.startswith("capture")]
    assert "capture: abliterate.model.capture:capture(batch_size=) defaults to 32, params.yaml capture.batch-size is 7" \
        in violations
    assert options_violations(params) == ["AblationOptions.projected is True, params.yaml ablate.projected is False"]


def test_command_and_params_rules_find_a_pasted_value_and_an_unlisted_key():
    doc = _load("dvc.yaml")
    doc["stages"]["capture"]["do"]["cmd"] += " --system-prompt '${capture.system-prompt}'"
    doc["stages"]["carry"]["do"]["cmd"] += " --name ${item}"
    doc["stages"]["reduce"]["cmd"] = doc["stages"]["reduce"]["cmd"].replace("--params params.yaml", "")
    assert command_violations(doc) == [
        "capture: its command pastes ${capture.system-prompt} into the shell",
        "reduce: stages.reduce reads params but its command lacks --params params.yaml",
        "carry: its command pastes ${item} into the shell",
    ]
    doc["stages"]["baseline"]["params"].remove("capture.max-prompt-tokens")
    doc["stages"]["evaluate"]["params"].append("score")
    assert params_violations(doc) == [
        "baseline: reads capture.max-prompt-tokens but dvc.yaml does not list it in its params",
        "evaluate: lists score in its params but reads none of it",
    ]


@pytest.mark.parametrize("module", ["abliterate", "stages"])
def test_importing_the_packages_loads_no_heavy_library(module):
    """``abliterate --help`` and DVC's per-stage start-up stay fast: nothing imports torch at module level."""
    import subprocess
    import sys

    names = [n for n in Graph().files if n.split(".")[0] == module and n != "stages.__main__"]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'optuna', 'pyarrow') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
