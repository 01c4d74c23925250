"""``abliterate chat``: talk to the ablated model, or to the base and ablated models side by side.

Type a message and press Enter; the answer streams token by token (greedy decoding, so the same
conversation always gives the same answers). The conversation is kept and rendered with the chat
template for each turn. Commands: ``/reset`` forgets the conversation, ``/exit`` (or ``/quit``),
Ctrl-D (end of input) or Ctrl-C end the session cleanly.

With ``--base`` both models answer each message; the two answers stream together in two columns,
and each model keeps its own side of the conversation. Logs and the input prompt go to stderr, the
answers to stdout.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

import typer

from abliterate.model.conversation import Speaker
from stages.cliutil import console, new_app, run_app

app = new_app(__doc__.splitlines()[0])


def _side_by_side(speakers: list[Speaker]):
    from rich.table import Table
    from rich.text import Text

    table = Table(expand=True, show_lines=False)
    for speaker in speakers:
        table.add_column(speaker.label, ratio=1)
    table.add_row(*(Text(s.text) for s in speakers))
    return table


POLL_SECONDS = 0.2


def read_line(stdin: TextIO) -> str:
    """One line of ``stdin`` ("" at the end of input).

    On a POSIX file descriptor the line is read byte by byte after polling, so that Ctrl-C ends
    the wait even when the signal is delivered to another thread (torch's or the tokenizer's):
    the main thread, blocked in read(), would otherwise not wake up until the next line came.
    """
    import os

    try:
        fd = stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return stdin.readline()
    if os.name != "posix":
        return stdin.readline()
    import select

    data = bytearray()
    while True:
        while not select.select([fd], [], [], POLL_SECONDS)[0]:
            pass  # returns to the interpreter, which raises a pending KeyboardInterrupt
        byte = os.read(fd, 1)
        if not byte:
            break
        data += byte
        if byte == b"\n":
            break
    return data.decode(getattr(stdin, "encoding", None) or "utf-8", errors="replace")


def converse(speakers: list[Speaker], max_new_tokens: int, stdin: TextIO, stdout: TextIO) -> int:
    """The read-answer loop; returns the number of messages answered. Ends on EOF, /exit or Ctrl-C."""
    from rich.console import Console
    from rich.live import Live

    log, answered = console(), 0
    out = Console(file=stdout, highlight=False)
    try:
        while True:
            sys.stderr.write("you> ")
            sys.stderr.flush()
            line = read_line(stdin)
            if not line:  # end of input (Ctrl-D)
                log.print()
                break
            message = line.strip()
            if not message:
                continue
            if message in ("/exit", "/quit"):
                break
            if message == "/reset":
                for speaker in speakers:
                    speaker.history = []
                log.print("(conversation forgotten)")
                continue
            streams = [speaker.start(message, max_new_tokens) for speaker in speakers]
            if len(speakers) == 1:
                for _rows, tokens, _ended in streams[0]:
                    stdout.write(speakers[0].add(tokens[0]))
                    stdout.flush()
                stdout.write("\n")
            else:
                with Live(_side_by_side(speakers), console=out, auto_refresh=False) as live:
                    running = list(zip(speakers, streams))
                    while running:
                        still = []
                        for speaker, stream in running:
                            step = next(stream, None)
                            if step is not None:
                                speaker.add(step[1][0])
                                still.append((speaker, stream))
                        running = still
                        live.update(_side_by_side(speakers), refresh=True)
            stdout.flush()
            for speaker in speakers:
                speaker.finish()
            answered += 1
    except KeyboardInterrupt:
        stdout.write("\n")
        log.print("(interrupted)")
    return answered


@app.command()
def main(
    model: Path = typer.Option(Path("artifacts/model"), help="The ablated model folder."),
    base: bool = typer.Option(False, "--base", help="Also answer with the base model, side by side."),
    base_model: Path = typer.Option(Path("models/base"), help="The base model folder (with --base)."),
    max_new_tokens: int = typer.Option(256, help="Most tokens per answer."),
    system_prompt: str = typer.Option("", help="System prompt placed before the conversation."),
    chat_template: str = typer.Option("", help="Jinja chat template file for models without one."),
    dtype: str = typer.Option("auto", help="auto (float32 on CPU, the checkpoint's on a GPU), checkpoint, float32, bfloat16, float16."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, mps."),
) -> None:
    """Chat with the ablated model (or, with --base, with the base and ablated models side by side)."""
    from abliterate.errors import fail
    from abliterate.model.modelio import check_model_dir, pick_device

    if max_new_tokens < 1:
        fail(f"max-new-tokens must be at least 1, got {max_new_tokens}")
    paths = ([("base", base_model)] if base else []) + [("ablated", model)]
    for _, path in paths:
        check_model_dir(path)
    device = pick_device(device)
    log = console()
    speakers = []
    for label, path in paths:
        with log.status(f"loading {label} model {path} ..."):
            speakers.append(Speaker(label, path, dtype, device, chat_template, system_prompt))
        log.print(f"{label} model: {path}")
    log.print("Type a message; /reset forgets the conversation, /exit or Ctrl-D ends.")
    import signal

    # Ctrl-C ends the chat, whatever handler the process inherited or a library installed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    converse(speakers, max_new_tokens, sys.stdin, sys.stdout)


if __name__ == "__main__":
    run_app(app)
