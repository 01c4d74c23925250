"""The root command, ``abliterate``: every stage, plus the tools around the pipeline.

Each stage module holds one typer command named ``main``; it is registered here under the stage's
name, so ``abliterate capture --help`` and ``python -m stages.capture --help`` show the same thing.
"""

from __future__ import annotations

import importlib

from stages.cliutil import new_app, run_app

# command name -> module under stages/
COMMANDS = {
    "use": "use",
    "base": "base",
    "capture": "capture",
    "reduce": "reduce",
    "score": "score",
    "export-refuse": "export_refuse",
    "search": "search",
    "plan": "plan",
    "ablate": "ablate",
    "finalize": "finalize",
    "verify": "verify",
    "baseline": "baseline",
    "evaluate": "evaluate",
    "chat": "chat",
}

app = new_app("Find the refusal direction of a language model and write a copy that cannot express it.")

for _name, _module in COMMANDS.items():
    _mod = importlib.import_module(f"stages.{_module}")
    app.command(_name, help=_mod.main.__doc__)(_mod.main)


def main() -> None:
    run_app(app, stage={name: f"stages.{module}" for name, module in COMMANDS.items()})
