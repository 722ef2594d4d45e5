#!/usr/bin/env python
"""Train an agent on a MiniGrid/BabyAI env; with no arguments, ThalamusPPO on DoorKey-5x5.

Examples (from the repository root, with the interpreter of ``scripts/setup.sh``'s venv)::

    .venv/bin/python scripts/train_agent.py                         # the default run
    .venv/bin/python scripts/train_agent.py --config memory_s7 --seed 1
    .venv/bin/python scripts/train_agent.py --env MiniGrid-MemoryS11-v0 --agent lstm
    .venv/bin/python scripts/train_agent.py ppo.learning_rate=1e-4 thalamus.top_k=8 train.video=true
    .venv/bin/python scripts/train_agent.py --resume runs/<env>__<agent>__<seed>__<time>

It prints the run directory before training starts and, at the end, a summary: the last
evaluation, the best model, and the commands to evaluate, watch and train on (spelled with
the interpreter it runs under, so they paste). Settings that will do nothing in the run
(``train.video=true`` with no evaluation inside the budget) are warned about first. Only
argument parsing, the config and the env registry are imported before training, so
``--help``, ``--help-config`` and ``--print-config`` answer without importing torch.

Exit codes: 0 done; 2 invalid config (nothing was trained) or a run another process writes;
3 non-finite loss or parameter (the last good checkpoint is kept); 4 disk full (what was saved
is intact); 128 + signal number when stopped by SIGINT/SIGTERM (a save in progress finishes
first, then a checkpoint is saved; continue with --resume). A signal after the budget's last
update lets the run finish its saves: 0.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from agents.constants import AGENT_KINDS

# Nothing here imports torch or stable-baselines3 (tests/test_train_script.py checks it):
# the training modules are imported only once a run is about to train.
from agents.experiment.config import (
    DEFAULT_CONFIG,
    ConfigError,
    ExperimentConfig,
    config_reference,
    config_to_yaml,
    find_config_for_env,
    inert_settings,
    load_config,
    sections_ignored_by,
)
from agents.experiment.hints import shell_path

if TYPE_CHECKING:
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.experiment.summary import EvalRecorder
    from agents.experiment.training import (
        ExtraCallbacks,
        RunCallbacks,
    )

# Flags that would change what a resumed run is (its config stays as saved).
FIXED_ON_RESUME = ("config", "env", "agent", "seed", "n_envs")
EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_DISK_FULL = 4

# Shortcut flags and the config key each one sets.
SHORTCUTS = {
    "env": "env.id",
    "agent": "agent.kind",
    "seed": "train.seed",
    "total_timesteps": "train.total_timesteps",
    "n_envs": "env.n_envs",
    "device": "train.device",
}


def _help_width() -> int:
    """The terminal's width, at most 100 columns (60 at least)."""
    return max(min(shutil.get_terminal_size((100, 24)).columns, 100), 60)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's layout, wrapped to :func:`_help_width` (argparse fills any terminal width)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_help_width())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_agent.py",
        description=textwrap.fill(
            "Train ThalamusPPO (or a PPO / LSTM baseline) on a MiniGrid or BabyAI env. The "
            "config is configs/defaults.yaml, then one per-env file, then the flags below, "
            "then KEY=VALUE overrides. A run writes runs/<env>__<agent>__<seed>__<time>/ with "
            "config.yaml, tensorboard events (tb/), checkpoints/, best_model.safetensors and "
            "final_model.safetensors.",
            width=79,
        ),
        epilog=textwrap.dedent(
            """\
            overrides:
              Any config key as a dotted KEY=VALUE, applied last, e.g. ppo.n_steps=64
              thalamus.top_k=8 env.env_kwargs.max_steps=100 train.video=true.
              Unknown keys, wrong types and out-of-range values stop before training.
              --help-config lists every key with its type, default and valid range.

            resume:
              --resume RUN_DIR continues the run from its latest checkpoint in the same
              directory and tensorboard curve. With it, only --total-timesteps, --device
              and ppo.* / thalamus_ppo.* / train.* overrides (not train.seed or
              train.runs_dir) may be given; --print-config shows the config it would use.

            exit codes: 0 done, 2 invalid config (or the run is being written by
            another process), 3 non-finite loss or parameter, 4 disk full (what was
            saved is intact), 128+N stopped by signal N (a checkpoint was saved).
            """
        ),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=(
            "per-env config: a path or a name in configs/ (e.g. memory_s7). Default: the file "
            f"whose env.id matches --env, else {DEFAULT_CONFIG.name}"
        ),
    )
    parser.add_argument("--env", metavar="ID", help="env id, e.g. MiniGrid-MemoryS7-v0 (env.id)")
    parser.add_argument("--agent", choices=AGENT_KINDS, help="agent kind (agent.kind)")
    parser.add_argument("--seed", type=int, metavar="S", help="random seed (train.seed)")
    parser.add_argument(
        "--total-timesteps",
        type=int,
        metavar="N",
        help="env steps to train (train.total_timesteps)",
    )
    parser.add_argument("--n-envs", type=int, metavar="N", help="parallel envs (env.n_envs)")
    parser.add_argument("--device", metavar="DEV", help="auto, cpu, cuda, cuda:N (train.device)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    return parser


def config_help(width: int | None = None) -> str:
    """The config reference: per key a line ``key  type  (default ...)`` and its meaning
    wrapped below it, a blank line between sections.

    :param width: line width; default the terminal's, at most 100 (60 at least).
    """
    width = _help_width() if width is None else width
    indent = "    "
    lines: list[str] = []
    section = None
    for key, type_name, default, help_text in config_reference():
        if key.split(".")[0] != section:
            if section is not None:
                lines.append("")
            section = key.split(".")[0]
        head = f"{key}  {type_name}  (default {default})"
        lines.extend(textwrap.wrap(head, width, subsequent_indent=indent + indent))
        if help_text:
            lines.extend(
                textwrap.wrap(help_text, width, initial_indent=indent, subsequent_indent=indent)
            )
    return "\n".join(lines)


def _overrides(args: argparse.Namespace) -> list[str]:
    shortcuts = [
        f"{key}={getattr(args, name)}"
        for name, key in SHORTCUTS.items()
        if getattr(args, name) is not None
    ]
    return shortcuts + list(args.overrides)


def _config_file(args: argparse.Namespace) -> Path | str | None:
    if args.config is not None:
        return args.config
    if args.env is not None:
        found = find_config_for_env(args.env)
        if found is None:
            print(
                f"note: no file in configs/ is for {args.env}; using configs/defaults.yaml only",
                file=sys.stderr,
            )
        return found
    return DEFAULT_CONFIG


def _note_unread_overrides(overrides: list[str], kind: str) -> None:
    """Say which command-line overrides the chosen agent never reads (e.g. ``thalamus.top_k``
    with ``--agent ppo``): they are valid keys, so nothing else would flag them."""
    unread_sections = sections_ignored_by(kind)
    unread = [o.split("=", 1)[0] for o in overrides if o.split(".", 1)[0] in unread_sections]
    if unread:
        print(
            f"note: agent.kind={kind} does not read {', '.join(unread)}; "
            f"{'it has' if len(unread) == 1 else 'they have'} no effect on this run",
            file=sys.stderr,
        )


def _warn_inert(config: ExperimentConfig) -> None:
    """Print a warning for each setting that will do nothing in this run."""
    for warning in inert_settings(config):
        print(f"WARNING: {warning}", file=sys.stderr, flush=True)


def _train_and_summarise(
    config: ExperimentConfig, start: Callable[[ExtraCallbacks], Path], fresh: bool
) -> int:
    """Run ``start(extra_callbacks)`` (a train or a resume) and print the closing summary.

    :param config: the run's config (for the summary).
    :param fresh: a new run: its directory is printed as soon as it exists.
    """
    from agents.experiment.callbacks import NonFiniteTrainingError
    from agents.experiment.io import DiskFullError
    from agents.experiment.summary import EvalRecorder, closing_summary
    from agents.experiment.training import TrainingInterrupted

    recorders: list[EvalRecorder] = []

    def extra_callbacks(run: RunCallbacks) -> list[BaseCallback]:
        recorders.append(EvalRecorder(run.evaluation))
        if fresh:  # before training starts (a resume says "resuming <run> from step N")
            print(f"run directory: {shell_path(run.checkpoint.checkpoint_dir.parent)}", flush=True)
        return recorders[-1:]

    started = time.monotonic()
    try:
        run_dir = start(extra_callbacks)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except NonFiniteTrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NON_FINITE
    except DiskFullError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DISK_FULL
    except TrainingInterrupted as exc:
        print(str(exc), file=sys.stderr, flush=True)
        steps = exc.checkpoint.timesteps if exc.checkpoint is not None else 0
        records = recorders[0].records if recorders else []
        print(
            closing_summary(
                exc.run_dir,
                config,
                records,
                timesteps=steps,
                seconds=time.monotonic() - started,
                interrupted=True,
            )
        )
        return 128 + exc.signum
    recorder = recorders[0] if recorders else None
    print(
        closing_summary(
            run_dir,
            config,
            recorder.records if recorder is not None else [],
            timesteps=(
                recorder.final_timesteps
                if recorder is not None and recorder.final_timesteps is not None
                else config.train.total_timesteps
            ),
            seconds=time.monotonic() - started,
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.help_config:
        print(config_help())
        return 0

    try:
        if args.resume is not None:
            clashes = [
                f"--{n.replace('_', '-')}" for n in FIXED_ON_RESUME if getattr(args, n) is not None
            ]
            if clashes:
                raise ConfigError(
                    f"{', '.join(clashes)} cannot be combined with --resume: a resumed run keeps "
                    "its config (only --total-timesteps, --device and ppo.*, thalamus_ppo.* and "
                    "train.* overrides may change)"
                )
            from agents.experiment.training import (
                resume,
                resumed_config,
            )

            overrides = list(args.overrides)
            if args.device is not None:
                overrides.append(f"train.device={args.device}")
            config = resumed_config(args.resume, overrides, total_timesteps=args.total_timesteps)
            if args.print_config:
                print(config_to_yaml(config), end="")
                return 0
            return _train_and_summarise(
                config,
                lambda extra: resume(
                    args.resume,
                    overrides,
                    total_timesteps=args.total_timesteps,
                    extra_callbacks=extra,
                ),
                fresh=False,
            )
        config = load_config(_config_file(args), _overrides(args))
        _note_unread_overrides(args.overrides, config.agent.kind)
        _warn_inert(config)
        if args.print_config:
            print(config_to_yaml(config), end="")
            return 0
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    from agents.experiment.training import train

    return _train_and_summarise(
        config, lambda extra: train(config, extra_callbacks=extra), fresh=True
    )


if __name__ == "__main__":
    sys.exit(main())
