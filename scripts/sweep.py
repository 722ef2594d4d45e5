#!/usr/bin/env python
"""Search hyperparameters with Ray Tune (configs/sweeps/*.yaml) and write the best config.

Examples::

    python scripts/sweep.py ppo_keycorridor_s3r1               # a local Ray, one trial per CPU
    python scripts/sweep.py ppo_keycorridor_s3r1 --cpus 2
    python scripts/sweep.py ppo_keycorridor_s3r1 --check       # validate the file, train nothing
    python scripts/sweep.py ppo_keycorridor_s3r1 --results     # tables and best.yaml again
    python scripts/sweep.py ppo_keycorridor_s3r1 --address head:6379 --storage /shared/sweeps

Each trial trains through agents.experiment.training (the code scripts/train_agent.py uses) and
reports
its periodic evaluations to Tune; ASHA stops the trials that fall behind. The sweep's folder
(<storage>/<name>/) gets trials.md and trials.csv (one row per trial) and best.yaml, the
config of the best trial that trained the whole budget:

    python scripts/train_agent.py --config runs/sweeps/ppo_keycorridor_s3r1/best.yaml

Run the same command again after an interruption (Ctrl-C, a crash): the sweep continues
(Tuner.restore), finished trials are kept and unfinished ones continue from their
checkpoints.

Exit codes: 0 done; 1 some trials failed (the others finished); 2 invalid sweep file;
130 interrupted (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from agents.bench.records import git_commit
from agents.bench.runner import ray_session
from agents.bench.suite import REPO_ROOT
from agents.bench.sweep import (
    SWEEP_DIR,
    load_sweep,
    restore_results,
    run_sweep,
    unfinished_trials,
    write_results,
)
from agents.experiment.hints import script_command
from agents.experiment.schema import SchemaError

EXIT_FAILED = 1
EXIT_INVALID = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sweep.py",
        description=(
            "Search hyperparameters with Ray Tune: every trial is a training run of "
            "scripts/train_agent.py's code; writes trials.md, trials.csv and best.yaml."
        ),
    )
    parser.add_argument(
        "sweep",
        metavar="SWEEP",
        help=f"a sweep file or a name in {SWEEP_DIR.relative_to(REPO_ROOT)}/",
    )
    parser.add_argument(
        "--cpus", type=int, default=None, metavar="N", help="CPUs of the local Ray (default: all)"
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="run on this existing Ray cluster instead of a local Ray; give --storage too",
    )
    parser.add_argument(
        "--storage",
        type=Path,
        metavar="PATH",
        help="where the sweep's folder goes, instead of the file's storage (on a cluster: a "
        "path every node reaches)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted sweep (also what happens without it when the sweep's "
        "folder holds one); an error if there is none",
    )
    parser.add_argument("--check", action="store_true", help="validate the file and exit")
    parser.add_argument(
        "--results",
        action="store_true",
        help="write the tables and best.yaml from the sweep's folder; train nothing",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        if args.storage is not None:
            if args.address is not None and not args.storage.is_absolute():
                raise SchemaError(f"--storage {args.storage} must be an absolute path")
            sweep = dataclasses.replace(sweep, storage=args.storage.resolve())
        elif args.address is not None:
            raise SchemaError(
                f"--address {args.address} runs on other machines: give --storage PATH, a "
                "folder every node reaches"
            )
        if args.check:
            print(f"sweep {sweep.name}: valid; folder {sweep.folder}")
            return 0
        from ray import tune

        restorable = tune.Tuner.can_restore(str(sweep.folder))
        if (args.resume or args.results) and not restorable:
            raise SchemaError(f"{sweep.folder} holds no sweep to continue or report; run it first")
        with ray_session(cpus=args.cpus, address=args.address):
            results = restore_results(sweep) if args.results else run_sweep(sweep)
            if unfinished_trials(sweep):  # Tune caught Ctrl-C, saved its state and returned
                raise KeyboardInterrupt
            written = write_results(sweep, results, git_commit())
        for kind, path in written.items():
            print(f"{kind}: {path}")
        if "best" in written:
            print("train it: " + script_command("train_agent.py", "--config", written["best"]))
        return EXIT_FAILED if any(r.error is not None for r in results) else 0
    except SchemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
