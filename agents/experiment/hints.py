"""Commands printed for the user to paste: the interpreter and tools of this very process.

A hint like ``python scripts/evaluate.py RUN`` fails when pasted into a shell without the
project's virtual environment activated (``No module named 'agents'``, ``tensorboard: command
not found``). These helpers spell the interpreter as the path this process runs under
(``.venv/bin/python`` from the repository root, an absolute path elsewhere), the tensorboard
launcher as the one installed beside it, and paths relative to the working directory where
they lie under it, so the printed command works as printed. No torch import: the scripts'
argument parsers use it.

>>> shell_path(Path.cwd() / "runs" / "a b")
"'runs/a b'"
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

__all__ = ["python_command", "script_command", "shell_path", "tensorboard_command"]

SCRIPTS_DIR = Path(__file__).resolve().parents[2] / "scripts"
"""The repository's ``scripts/`` folder."""


def shell_path(path: str | os.PathLike[str]) -> str:
    """``path`` quoted for a POSIX shell: relative to the working directory where it lies
    under it (``runs/x``), else absolute."""
    absolute = Path(os.path.abspath(path))  # not resolve(): a venv's python is a symlink
    cwd = Path.cwd()
    shown = absolute.relative_to(cwd) if absolute.is_relative_to(cwd) else absolute
    return shlex.quote(str(shown))


def python_command() -> str:
    """The interpreter running this process, e.g. ``.venv/bin/python``."""
    return shell_path(sys.executable)


def script_command(script: str, *args: str | os.PathLike[str]) -> str:
    """``<python> scripts/<script> ARGS``, e.g. ``.venv/bin/python scripts/evaluate.py runs/x``.

    :param script: a file in ``scripts/``, e.g. ``"evaluate.py"``.
    :param args: arguments; paths are shown as :func:`shell_path` shows them, strings quoted.
    """
    shown = [shell_path(a) if isinstance(a, os.PathLike) else shlex.quote(str(a)) for a in args]
    return " ".join([python_command(), shell_path(SCRIPTS_DIR / script), *shown])


def tensorboard_command(logdir: str | os.PathLike[str]) -> str:
    """``tensorboard --logdir LOGDIR`` with the launcher installed beside this interpreter
    (``.venv/bin/tensorboard``), or ``<python> -m tensorboard.main`` where there is none."""
    launcher = Path(os.path.abspath(sys.executable)).parent / "tensorboard"
    command = (
        shell_path(launcher) if launcher.is_file() else f"{python_command()} -m tensorboard.main"
    )
    return f"{command} --logdir {shell_path(logdir)}"
