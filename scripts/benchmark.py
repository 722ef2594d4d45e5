#!/usr/bin/env python
"""Run benchmark suites (configs/benchmarks/*.yaml) and turn their records into a report.

Examples::

    python scripts/benchmark.py quick                      # the smoke suite, a few minutes
    python scripts/benchmark.py quick --report             # its report
    python scripts/benchmark.py full --cpus 4              # the full suite, 4 runs at a time
    python scripts/benchmark.py full --address head:6379 --storage /shared/bench   # on a cluster
    python scripts/benchmark.py full --list                # each run's status, no training
    python scripts/benchmark.py full --only 'MiniGrid-MemoryS7-v0__*'
    python scripts/benchmark.py full ablations speed --report    # docs/benchmarks/README.md
    python scripts/benchmark.py --alternated fps           # agents' fps, alternated in one run
    python scripts/benchmark.py --alternated threshold     # DoorKey time to 0.9, alternated

Every run trains through agents.experiment.training (the code scripts/train_agent.py uses), as a Ray
task in a fresh process (a local Ray by default, one run per CPU), and writes one JSON
record to <out>/records/<suite>/<task>__<agent>__<seed>.json. Runs with a record are
skipped; a run stopped before it (crash, Ctrl-C) continues from its latest checkpoint when
the suite is run again.

Exit codes: 0 done; 1 some runs failed (the others finished); 2 invalid suite or records;
130 interrupted (checkpoints were saved; run the same command again to continue).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from agents.bench.records import record_path
from agents.bench.report import write_report
from agents.bench.runner import run_status, run_suite
from agents.bench.speed import SPEED_AGENTS, SPEED_ENVS, split_overrides
from agents.bench.suite import REPO_ROOT, SUITE_DIR, BenchmarkError, Suite, load_suite
from agents.experiment.config import yaml_file_names
from agents.experiment.hints import script_command

EXIT_FAILED = 1
EXIT_INVALID = 2
DEFAULT_RUNS_DIR = REPO_ROOT / "runs" / "benchmarks"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmark.py",
        description=(
            "Run benchmark suites through the training code of scripts/train_agent.py and "
            "write one JSON record per run; --report turns the records into <out>/README.md "
            "with tables and plots."
        ),
    )
    parser.add_argument(
        "suites",
        nargs="*",
        metavar="SUITE",
        help=(
            f"suite files or names in {SUITE_DIR.relative_to(REPO_ROOT)}/ "
            f"({yaml_file_names(SUITE_DIR)}). "
            "With --report and none given: every suite with records in --out"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=(
            "where records/, README.md and plots/ go (default: the suite's output, e.g. "
            "docs/benchmarks for full, runs/benchmark_reports/quick for quick)"
        ),
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="where the run directories (checkpoints, tensorboard) go (default: runs/benchmarks, "
        "or PATH/runs with --storage)",
    )
    parser.add_argument(
        "--cpus",
        "--parallel",
        type=int,
        default=None,
        metavar="N",
        help="CPUs of the local Ray: runs at a time, one per CPU (default: all of this machine's)",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        help="run on this existing Ray cluster (e.g. ray://head:10001 or head:6379) instead of "
        "a local Ray; give --storage too",
    )
    parser.add_argument(
        "--storage",
        type=Path,
        metavar="PATH",
        help="a folder every node of the cluster reaches (shared disk): run directories go to "
        "PATH/runs and records to PATH/<suite> unless --runs-dir / --out say otherwise",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only runs whose <task>__<agent>__<seed> matches this glob (repeatable)",
    )
    parser.add_argument("--report", action="store_true", help="write the report; train nothing")
    parser.add_argument("--list", action="store_true", help="print each run's status and exit")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run in this process, one at a time (debugging; peak memory then covers all runs)",
    )
    alt = parser.add_argument_group(
        "alternated speed suite (agents/bench/speed.py)",
        "Every cell (env x agent x threads) is a worker process; one at a time trains a few "
        "updates, round after round, so ratios compare cells under the same machine load.",
    )
    alt.add_argument(
        "--alternated",
        choices=["fps", "threshold"],
        help="fps: training throughput; threshold: training seconds to --threshold",
    )
    alt.add_argument(
        "--envs",
        nargs="+",
        default=None,
        metavar="ENV",
        help="fps default: DoorKey-5x5, MemoryS7, GoToLocal; threshold: DoorKey-5x5",
    )
    alt.add_argument("--agents", nargs="+", default=list(SPEED_AGENTS), metavar="KIND")
    alt.add_argument(
        "--threads",
        nargs="+",
        type=int,
        default=[1, 2],
        metavar="N",
        help="torch threads per run, one table each (default 1 2)",
    )
    alt.add_argument("--rounds", type=int, default=5, help="fps rounds (default 5)")
    alt.add_argument("--updates", type=int, default=2, help="updates per cell per round")
    alt.add_argument(
        "--compare",
        nargs="+",
        type=Path,
        default=[],
        metavar="CHECKOUT",
        help="also measure the thalamus agent from these checkouts (before/after)",
    )
    alt.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="LABEL=KEY=VALUE[,KEY=VALUE]",
        help="also measure the thalamus agent with these overrides, as row LABEL "
        "(e.g. compiled=policy.compile_core=true); repeatable",
    )
    alt.add_argument("--threshold", type=float, default=0.9)
    alt.add_argument("--eval-every", type=int, default=5, help="updates between evaluations")
    alt.add_argument("--eval-episodes", type=int, default=20)
    alt.add_argument("--budget-updates", type=int, default=150, help="per cell (threshold)")
    alt.add_argument("--seed", type=int, default=0)
    alt.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="JSON",
        help="write the raw result here (the Markdown goes to stdout)",
    )
    return parser


def _alternated(args: argparse.Namespace) -> int:
    """The alternated speed suite: fps or time to threshold, printed as Markdown."""
    import json

    from agents.bench.speed import Cell, fps_markdown, measure_fps, threshold_markdown
    from agents.bench.speed import time_to_threshold as run_threshold

    default_envs = list(SPEED_ENVS) if args.alternated == "fps" else [SPEED_ENVS[0]]
    envs = args.envs or default_envs
    threads = args.threads if args.alternated == "fps" else args.threads[:1]
    cells = [
        Cell(env=env, agent=agent, threads=n, seed=args.seed)
        for n in threads
        for env in envs
        for agent in args.agents
    ]
    cells += [
        Cell(env=env, agent="thalamus", threads=n, seed=args.seed, repo=repo)
        for n in threads
        for env in envs
        for repo in args.compare
    ]
    for spec in args.variant:
        label, sep, overrides = spec.partition("=")
        if not sep or not label or "=" not in overrides:
            raise BenchmarkError(
                f"--variant {spec!r}: expected LABEL=KEY=VALUE[,KEY=VALUE], "
                "e.g. compiled=policy.compile_core=true"
            )
        try:
            variant_overrides = split_overrides(overrides)
        except ValueError as error:
            raise BenchmarkError(f"--variant {spec!r}: {error}") from None
        cells += [
            Cell(
                env=env,
                agent="thalamus",
                threads=n,
                seed=args.seed,
                label=label,
                overrides=variant_overrides,
            )
            for n in threads
            for env in envs
        ]
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.alternated == "fps":
        result = measure_fps(cells, rounds=args.rounds, updates=args.updates, log=log)
        print(fps_markdown(result))
    else:
        result = run_threshold(
            cells,
            threshold=args.threshold,
            eval_every=args.eval_every,
            eval_episodes=args.eval_episodes,
            budget_updates=args.budget_updates,
            log=log,
        )
        print(threshold_markdown(result))
    if args.save is not None:
        args.save.write_text(json.dumps(result, indent=1))
    return 0


def _out(suite: Suite, args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.storage is not None:
        return args.storage / suite.name
    return suite.output if suite.output.is_absolute() else REPO_ROOT / suite.output


def _runs_dir(args: argparse.Namespace) -> Path:
    if args.runs_dir is not None:
        return args.runs_dir
    return DEFAULT_RUNS_DIR if args.storage is None else args.storage / "runs"


def _check_cluster_args(args: argparse.Namespace) -> None:
    if args.storage is not None and not args.storage.is_absolute():
        raise BenchmarkError(
            f"--storage {args.storage} must be an absolute path (the same on every node)"
        )
    if args.address is not None and args.storage is None:
        raise BenchmarkError(
            f"--address {args.address} runs on other machines: give --storage PATH, a folder "
            "every node reaches, for the run directories and records"
        )
    if args.address is not None and args.in_process:
        raise BenchmarkError("--in-process runs here: drop --address or --in-process")


def _report_suites(args: argparse.Namespace) -> list[Suite]:
    """The named suites, or every suite with a records folder in --out (or, with --storage,
    in one of its suite folders)."""
    if args.suites:
        return [load_suite(name, check_configs=False) for name in args.suites]
    if args.out is None and args.storage is not None:
        names = sorted(p.parent.parent.name for p in args.storage.glob("*/records/*") if p.is_dir())
        if not names:
            raise BenchmarkError(f"no records under {args.storage}; name the suites to report")
        return [load_suite(name, check_configs=False) for name in names]
    out = args.out if args.out is not None else REPO_ROOT / "docs" / "benchmarks"
    names = _record_folders(out)
    if not names:
        raise BenchmarkError(f"no records in {out / 'records'}; name the suites to report")
    return [load_suite(name, check_configs=False) for name in names]


def _with_reported_neighbours(named: list[Suite], out: Path) -> list[Suite]:
    """``named`` plus every other suite with a records folder in ``out``, ordered by name.

    The report is one file per ``out``: reporting one suite must not drop the sections of the
    suites whose records sit beside it.
    """
    by_name = {suite.name: suite for suite in named}
    for name in _record_folders(out):
        if name not in by_name:
            by_name[name] = load_suite(name, check_configs=False)
    return [by_name[name] for name in sorted(by_name)]


def _record_folders(out: Path) -> list[str]:
    """The names of the suites with a records folder in ``out``, sorted."""
    return sorted(p.name for p in (out / "records").glob("*") if p.is_dir())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.alternated:
            return _alternated(args)
        if args.report:
            suites = _report_suites(args)
            outs = {_out(s, args) for s in suites}
            for out in sorted(outs):
                named = [s for s in suites if _out(s, args) == out]
                path = write_report(_with_reported_neighbours(named, out), out)
                print(f"report: {path}")
            return 0
        if not args.suites:
            raise BenchmarkError("name at least one suite to run, e.g. quick or full")
        _check_cluster_args(args)
        suites = [load_suite(name) for name in args.suites]
        if args.list:
            for suite in suites:
                out = _out(suite, args)
                for run in suite.runs:
                    status = run_status(run, out, _runs_dir(args))
                    where = record_path(out, run) if status.startswith("done") else ""
                    print(f"{suite.name:<10} {run.key:<50} {status:<24} {where}")
            return 0
        failed = 0
        for suite in suites:
            out = _out(suite, args)
            results = run_suite(
                suite,
                out,
                _runs_dir(args),
                cpus=args.cpus,
                address=args.address,
                only=args.only,
                in_process=args.in_process,
            )
            failed += sum(error is not None for error in results.values())
            print(f"suite {suite.name}: records in {out / 'records' / suite.name}")
        where = ["--storage", str(args.storage)] if args.storage is not None else []
        where += ["--out", str(args.out)] if args.out is not None else []
        print("report: " + script_command("benchmark.py", *args.suites, "--report", *where))
        return EXIT_FAILED if failed else 0
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
