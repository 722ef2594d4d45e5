#!/usr/bin/env python
"""Train an agent on a MiniGrid/BabyAI env; with no arguments, ThalamusPPO on DoorKey-5x5.

Examples::

    python scripts/train_agent.py                                   # the default run
    python scripts/train_agent.py --config memory_s7 --seed 1
    python scripts/train_agent.py --env MiniGrid-MemoryS11-v0 --agent lstm
    python scripts/train_agent.py ppo.learning_rate=1e-4 thalamus.top_k=8 train.video=true
    python scripts/train_agent.py --resume runs/<env>__<agent>__<seed>__<time>

Exit codes: 0 done; 2 invalid config (nothing was trained) or a run another process writes;
3 non-finite loss or parameter (the last good checkpoint is kept); 4 disk full (what was saved
is intact); 128 + signal number when stopped by SIGINT/SIGTERM (a save in progress finishes
first, then a checkpoint is saved; continue with --resume). A signal after the budget's last
update lets the run finish its saves: 0.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

from agents import AGENT_KINDS
from agents.config import (
    DEFAULT_CONFIG,
    ConfigError,
    config_reference,
    config_to_yaml,
    find_config_for_env,
    load_config,
    sections_ignored_by,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_agent.py",
        description=(
            "Train ThalamusPPO (or a PPO / LSTM baseline) on a MiniGrid or BabyAI env. The "
            "config is configs/defaults.yaml, then one per-env file, then the flags below, "
            "then KEY=VALUE overrides. A run writes runs/<env>__<agent>__<seed>__<time>/ with "
            "config.yaml, tensorboard events (tb/), checkpoints/, best_model.safetensors and "
            "final_model.safetensors."
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def config_help() -> str:
    """The config reference as an aligned table."""
    rows = config_reference()
    key_w = max(len(r[0]) for r in rows)
    type_w = max(len(r[1]) for r in rows)
    default_w = min(max(len(r[2]) for r in rows), 24)
    lines = []
    for key, type_name, default, help_text in rows:
        lines.append(f"{key:<{key_w}}  {type_name:<{type_w}}  {default:<{default_w}}  {help_text}")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.help_config:
        print(config_help())
        return 0

    from agents.callbacks import DiskFullError, NonFiniteTrainingError
    from agents.training import TrainingInterrupted, resume, resumed_config, train

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
            overrides = list(args.overrides)
            if args.device is not None:
                overrides.append(f"train.device={args.device}")
            if args.print_config:
                config = resumed_config(
                    args.resume, overrides, total_timesteps=args.total_timesteps
                )
                print(config_to_yaml(config), end="")
                return 0
            run_dir = resume(args.resume, overrides, total_timesteps=args.total_timesteps)
        else:
            config = load_config(_config_file(args), _overrides(args))
            _note_unread_overrides(args.overrides, config.agent.kind)
            if args.print_config:
                print(config_to_yaml(config), end="")
                return 0
            run_dir = train(config)
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
        print(str(exc), file=sys.stderr)
        return 128 + exc.signum
    print(f"done: {run_dir}")
    print(f"  evaluate: python scripts/evaluate.py {run_dir} --video-dir {run_dir / 'videos'}")
    print(f"  curves:   tensorboard --logdir {run_dir.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
