"""A copy of this project in a temporary git + DVC repository, for the pipeline tests.

The copy holds the real dvc.yaml, params.yaml, .dvc config, abliterate/ and stages/ (so
``python -m stages.X`` runs the code under test), small prompt files, and is pointed at a tiny model with
``abliterate use``. Commands run in subprocesses, as a user would run them.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path


from tests.measure_helpers import BORDERLINE, HARMFUL, HARMLESS, REPO, write_lines  # noqa: F401 (re-exported)


def environment(tmp: Path) -> dict:
    """Subprocess environment: no analytics, no hub, git identity, this interpreter first on PATH."""
    env = dict(os.environ)
    env.update({
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(tmp / "dvc-site"),
        "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
        "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.com",
        "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf"),
        "OMP_NUM_THREADS": "2",
    })
    env.pop("PYTHONPATH", None)  # abliterate/ and stages/ must come from the repository under test
    return env


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def dvc(root: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], root, env, check)


def git(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return run(["git", *args], root, env)


def stages_run(result: subprocess.CompletedProcess) -> set[str]:
    """The stages a ``dvc repro`` / ``dvc exp run`` actually ran (not the cached or skipped ones)."""
    return set(re.findall(r"Running stage '([^']+)'", result.stdout + result.stderr))


def stale(root: Path, env: dict, *targets: str) -> dict:
    """``dvc status --json`` of ``targets`` and everything they depend on ({} = up to date)."""
    return json.loads(dvc(root, env, "status", "--json", "--with-deps", *targets).stdout or "{}")


def set_params(path: Path, **values) -> None:
    """Edit params.yaml as a user would, comments kept: ``set_params(p, **{"ablate.scale": 0.5})``."""
    from ruamel.yaml import YAML

    yaml = YAML()
    data = yaml.load(path.read_text())
    for dotted, value in values.items():
        group, key = dotted.split(".", 1)
        assert data[group][key] != value, f"{dotted} is already {value!r}"
        data[group][key] = value
    buffer = io.StringIO()
    yaml.dump(data, buffer)
    path.write_text(buffer.getvalue())


def copy_pipeline(root: Path) -> Path:
    """Create ``root`` with this project's pipeline files: dvc.yaml, params.yaml, model.yaml, the
    ignore files, the DVC config (no cache), the library and the stages."""
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml", "model.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    for package in ("abliterate", "stages"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def make_project(tmp: Path, model: Path, env: dict, harmful: list[str] = HARMFUL, harmless: list[str] = HARMLESS,
                 eval_harmful: list[str] | None = None, eval_harmless: list[str] | None = None,
                 params: dict | None = None) -> Path:
    """Create ``tmp/repo``: this project's pipeline, small prompt files, pointed at ``model``; committed."""
    root = copy_pipeline(tmp / "repo")
    shutil.copytree(REPO / "prompts" / "demo", root / "prompts" / "demo")
    write_lines(root / "prompts" / "harmful.txt", harmful)
    write_lines(root / "prompts" / "harmless.txt", harmless)
    write_lines(root / "prompts" / "eval" / "harmful.txt", eval_harmful or harmful[::-1])
    write_lines(root / "prompts" / "eval" / "harmless.txt", eval_harmless or harmless[::-1])
    write_lines(root / "prompts" / "eval" / "borderline.txt", BORDERLINE)
    write_lines(root / "prompts" / "borderline.txt", BORDERLINE[::-1])
    git(root, env, "init", "-q")
    if params:
        set_params(root / "params.yaml", **params)
    run([sys.executable, "-m", "stages.use", str(model)], root, env)
    git(root, env, "add", "-A")
    git(root, env, "commit", "-qm", "pipeline on a tiny model")
    return root
