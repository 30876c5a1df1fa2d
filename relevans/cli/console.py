"""How the `relevans` command writes: rich consoles for stdout and stderr, and one-line errors."""

from __future__ import annotations

import os
import sys
from typing import IO, NoReturn

import typer
from rich.console import Console
from rich.table import Table

# Off a terminal (a pipe, a file) tables and lines are laid out this wide, so nothing wraps.
PIPE_WIDTH = 240


def console(stream: IO[str] | None = None) -> Console:
    """A console on `stream` (stdout): the terminal's width there, `PIPE_WIDTH` elsewhere; no
    highlighting or markup guesses in what the services and files said."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    return Console(file=stream, highlight=False, width=None if tty else PIPE_WIDTH, soft_wrap=not tty)


def print_table(table: Table, stream: IO[str] | None = None) -> None:
    """`table` on `stream` (stdout), its lines without the cells' trailing padding."""
    screen = console(stream)
    with screen.capture() as captured:
        screen.print(table)
    lines = [line.rstrip() for line in captured.get().splitlines()]
    (stream or sys.stdout).write("\n".join(lines).strip("\n") + "\n")


def say(message: str, stream: IO[str] | None = None) -> None:
    """One line of plain text (no markup) on `stream` (stderr)."""
    console(stream or sys.stderr).print(message, markup=False)


def fail(command: str, message: str, code: int = 2) -> NoReturn:
    """Ends the command with one line on stderr, `relevans <command>: <message>`, and `code`."""
    say(f"relevans {command}: {message}")
    raise typer.Exit(code)


def quiet_broken_pipe() -> None:
    """After the reader of stdout went away (`| head -1`): later writes, and the interpreter's
    final flush, go nowhere instead of raising."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
