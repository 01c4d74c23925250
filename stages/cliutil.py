"""What every command shares: the one-line error convention, option parsers, the stderr console.

Every error a user can cause is raised as :class:`abliterate.errors.UserError` (or is a click
usage error) and ends the process with one line on stderr and exit code 2, never a traceback.
Logs and progress go to stderr: live bars on a terminal, plain lines otherwise
(:func:`reporter`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import NoReturn, TypeVar

from abliterate.errors import UserError, fail
from abliterate.progress import Reporter, Task

EXIT_USER_ERROR = 2
T = TypeVar("T")


def console():
    """The rich console for logs and progress: always stderr, so stdout stays clean."""
    from rich.console import Console

    return Console(stderr=True)


def parse_bool(value: str | bool, name: str = "value") -> bool:
    """Parse ``true/false`` (as DVC writes booleans into a command line) into a bool."""
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    fail(f"{name} must be true or false, got {value!r}")


def new_app(help_text: str) -> typer.Typer:
    """A typer app configured the same way everywhere (no locals in tracebacks, no completion)."""
    import typer

    return typer.Typer(
        help=help_text,
        add_completion=False,
        pretty_exceptions_show_locals=False,
        no_args_is_help=False,
    )


def lazy_app(module_globals: dict, command: Callable) -> Callable[[str], object]:
    """A module ``__getattr__`` that builds the module's typer ``app`` (one ``command``) on first use:
    stages that DVC starts once per shard or file read their few options directly and never import typer."""

    def __getattr__(name: str):
        if name != "app":
            raise AttributeError(f"module {module_globals['__name__']!r} has no attribute {name!r}")
        app = new_app(module_globals["__doc__"].split("\n")[0])
        app.command()(command)
        module_globals["app"] = app
        return app

    return __getattr__


def option(**kwargs):
    """``typer.Option(**kwargs)``, importing typer only when a command's options are read: a module
    whose annotations use this instead of ``typer.Option`` can run without importing typer."""
    import typer

    return typer.Option(**kwargs)


def _exception_classes(name: str) -> tuple[type, ...]:
    """Every class called ``name`` among click's and typer's exceptions (typer >= 0.2x vendors its
    own click, whose exceptions are not click's, and keeps Abort/Exit in typer.exceptions)."""
    import importlib

    found: list[type] = []
    for module_name in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def run_app(app: typer.Typer, argv: list[str] | None = None, stage: str | dict[str, str] | None = None) -> None:
    """Run ``app``; turn user errors and usage errors into one line on stderr and exit 2.

    ``stage``: the stage module whose options ``--params FILE`` fills (:mod:`stages.paramfile`), or
    for a group of commands ``{command name: stage module}``.
    """
    aborts = _exception_classes("Abort")
    usage = _exception_classes("ClickException")
    exits = _exception_classes("Exit")

    argv = list(sys.argv[1:] if argv is None else argv)
    extra = {}
    if stage is not None and ("--help" in argv or not argv):
        from stages.paramfile import add_help

        add_help(app, stage)
    if any(a == "--params" or a.startswith("--params=") for a in argv):
        from stages.paramfile import default_map

        argv, extra["default_map"] = run_guarded(lambda: default_map(app, argv, stage))
    try:
        code = run_guarded(lambda: app(args=argv, standalone_mode=False, **extra))
    except aborts:
        _die("interrupted", code=130)
    except usage as exc:
        # Usage errors: bad option type, missing option, unknown option.
        _die(exc.format_message().replace("\n", " "))
    except exits as exc:
        sys.exit(exc.exit_code)
    # Without standalone mode, click returns the code of a ``typer.Exit(code)`` instead of exiting.
    if isinstance(code, int) and code != 0:
        sys.exit(code)


def run_guarded(call: Callable[[], T]) -> T:
    """``call()``, with a user error or Ctrl-C ending the process as one line on stderr."""
    try:
        return call()
    except UserError as exc:
        _die(str(exc))
    except KeyboardInterrupt:
        _die("interrupted", code=130)


def direct_options(argv: list[str], names: tuple[str, ...]) -> dict[str, str] | None:
    """``{name: value}`` if ``argv`` is exactly ``--name value`` for each of ``names`` (any order).

    For a stage that DVC starts many times with one fixed form of command line (ablate, once per
    shard): reading it here skips typer's start-up, about 0.1 s. Anything else (``--help``, a
    missing or extra option) gives None, and the caller hands ``argv`` to typer.
    """
    if len(argv) != 2 * len(names):
        return None
    found = dict(zip(argv[0::2], argv[1::2]))
    if sorted(found) != sorted(names) or any(value.startswith("--") for value in found.values()):
        return None
    return {name.removeprefix("--").replace("-", "_"): value for name, value in found.items()}


def _die(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(code)


class RichReporter(Reporter):
    """Live rich bars when stderr is a terminal; the plain lines of :class:`Reporter` otherwise."""

    def __init__(self):
        self.console = console()

    def message(self, text: str) -> None:
        if self.console.is_terminal:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            super().message(text)

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None, unit: str = "", **fields: str) -> Iterator[Task]:
        if not self.console.is_terminal:
            with super().task(description, total, unit, **fields) as task:
                yield task
            return
        from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn
        from rich.progress import TimeElapsedColumn, TimeRemainingColumn

        count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
        columns = (TextColumn("{task.description}"), BarColumn(), count, TextColumn("{task.fields[text]}"),
                   TimeElapsedColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=False) as bar:
            handle = bar.add_task(description, total=total, text=" ".join(v for v in fields.values() if v))
            task = _RichTask(description, total, unit, fields, self.message, bar, handle)
            yield task


class _RichTask(Task):
    def __init__(self, description, total, unit, fields, write, bar, handle):
        super().__init__(description, total, unit, fields, write)
        self.bar, self.handle = bar, handle

    def advance(self, n: float = 1) -> None:
        self.done += n
        self.bar.advance(self.handle, n)

    def update(self, **fields: str) -> None:
        super().update(**fields)
        self.bar.update(self.handle, text=" ".join(v for v in self.fields.values() if v))


def reporter() -> Reporter:
    """The reporter a command hands to the library."""
    return RichReporter()


def wide_table(table) -> None:
    """Print a rich table on stderr; a log (not a terminal) gets it whole rather than with ellipses."""
    log = console()
    if not log.is_terminal:
        log.width = max(log.width, 120)
    log.print(table)
