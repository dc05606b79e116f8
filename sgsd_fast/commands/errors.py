"""The one error path of every `sgsd-fast` command.

A command's work runs inside `run_command`: an error a user can fix (a bad value, file, bank,
checkpoint or missing package) ends the command with ONE line on stderr — the library's message,
which names the field or the file — and exit status 2; ``--debug`` anywhere on the command line
also prints the traceback. Ctrl-C is status 130. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sqlite3
import sys
import traceback
from collections.abc import Callable, Sequence

import yaml

DEBUG_FLAG = "--debug"
DEBUG_HELP = f"{DEBUG_FLAG} (anywhere on the line): print an error's traceback, not only its one-line message."
BAD_INPUT = 2
INTERRUPTED = 130


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean bad input or a broken environment, not a bug.

    ValueError covers ConfigError and the JSON/Unicode decode errors; OSError covers missing or
    unwritable files and a failed checkpoint save; ImportError a missing optional package with its
    install hint; KeyError/TypeError what the skill-bank commands raise for an unknown id or a
    wrongly typed JSON field; TrainingDiverged a run stopped for non-finite steps.
    """
    from sgsd_fast.train.trainer import TrainingDiverged

    return (ValueError, OSError, sqlite3.DatabaseError, yaml.YAMLError, ImportError, KeyError, TypeError,
            TrainingDiverged)


def describe(err: BaseException) -> str:
    """`err` as one line: its message, whitespace collapsed (a KeyError's without the repr quotes)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def split_debug(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """(argv without ``--debug``, whether it was given); None means ``sys.argv[1:]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [a for a in args if a != DEBUG_FLAG], DEBUG_FLAG in args


def run_command(prog: str, body: Callable[[], int | None], *, debug: bool = False) -> int:
    """Run `body` (a command's work) and turn a user error into one stderr line and status 2."""
    try:
        return int(body() or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED
    except _user_errors() as err:
        if debug:
            traceback.print_exc(file=sys.stderr)
        hint = "" if debug else f" (rerun with {DEBUG_FLAG} for the traceback)"
        print(f"{prog}: error: {describe(err)}{hint}", file=sys.stderr)
        return BAD_INPUT
