"""ablate: write one edited shard (only the planned tensors' bytes change).

A copy of the base shard in which only the byte ranges of the tensors listed in the shard's plan
file are recomputed (:mod:`abliterate.shard_edit`); written under a temporary name and renamed,
the input never written to.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from stages.cliutil import direct_options, lazy_app, option, reporter, run_app, run_guarded


def ablate(base: Path, plan_path: Path, out: Path) -> int:
    """Apply one shard's plan, with a progress bar on stderr when it is a terminal."""
    import sys

    from abliterate.formats.plans import load_shard_plan

    plan = load_shard_plan(plan_path)
    if Path(base).is_dir():  # the pipeline's form: the shard's file name comes from its plan, not the command
        from abliterate.names import check_file_name

        if not plan.file:
            from abliterate.errors import fail

            fail(f"{plan_path} names no shard file; with --base a folder, rerun `dvc repro plan`")
        check_file_name(plan.file, plan_path)
        base, out = Path(base) / plan.file, Path(out) / plan.file
    if sys.stderr.isatty():
        count = _with_bar(base, plan, out)
    else:  # a log or a queued `dvc exp run`: no bar to draw, and rich's import is skipped
        from abliterate.shard_edit import ablate_shard

        count = ablate_shard(base, plan, out)
    print(f"ablate: {out} written ({count} tensors edited, the rest copied)", file=sys.stderr)
    return count


def _with_bar(base: Path, plan, out: Path) -> int:
    from abliterate.shard_edit import ablate_shard

    with reporter().task(f"ablate {Path(base).name}", total=Path(base).stat().st_size, unit="bytes") as task:
        return ablate_shard(base, plan, out, progress=task.advance)


def main(
    base: Annotated[Path, option(help="The base shard, e.g. models/base/model-00001-of-00004.safetensors, or the "
                                      "base folder: then the shard named in the plan file, written into --out.")],
    plan: Annotated[Path, option(help="Its plan file, e.g. artifacts/plan/00001.json.")],
    out: Annotated[Path, option(help="The edited shard to write (never the base shard itself), or with --base a "
                                     "folder, the folder to write it into.")],
) -> None:
    """Write one edited shard: a copy of the base shard with only the planned tensors' bytes rewritten."""
    import gc

    # One matrix-vector product per chunk gains nothing from BLAS threads, whose idle spinning
    # takes the cores the producer and writer threads need (numpy is not imported yet here).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    collecting = gc.isenabled()
    gc.disable()  # the chunk loop makes no reference cycles; full collections only cost time
    terminated: list[int] = []
    previous = _raise_on_sigterm(terminated)
    try:
        ablate(base, plan, out)
    except Exception:
        if terminated:  # a SIGTERM inside an import (numpy's) comes out as an ImportError: it was the signal
            raise KeyboardInterrupt from None
        raise
    finally:
        if collecting:  # called in-process (tests, a notebook): leave the collector as it was
            gc.enable()
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm(seen: list[int]):
    """Make SIGTERM (a killed ``dvc repro``, a job scheduler) raise KeyboardInterrupt, so the temporary
    shard is removed as on Ctrl-C, and note it in ``seen``; returns the previous handler (None off the
    main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        seen.append(signum)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


# ``app``, the typer command, built on first use (DVC's per-shard runs never import typer)
__getattr__ = lazy_app(globals(), main)


if __name__ == "__main__":
    # DVC starts this once per shard with the same three options: they are read directly, without
    # typer (its import and start-up are about 0.1 s of a shard's 0.7 s); anything else goes to typer.
    import sys

    given = direct_options(sys.argv[1:], ("--base", "--plan", "--out"))
    if given is None:
        run_app(__getattr__("app"))
    else:
        run_guarded(lambda: main(**{name: Path(value) for name, value in given.items()}))
