#!/usr/bin/env python
"""Why does an agent fail MiniGrid-Memory? Does it look at the cue, and does its state hold it?

MiniGrid-MemoryS<N> starts the agent in or east of the start room, facing east, away from
the cue object (a key or a ball in the room's north-west corner). To succeed it must turn
back and look at the cue, walk the hallway and go to the matching object at the split.
A success rate near 0.5 can mean two different failures: the agent never looks at the cue
(an exploration failure, memory never gets tested), or it looks but its state does not hold
the cue at the split (a memory failure). This script tells them apart
(the logic is in ``agents/experiment/memory_diagnosis.py``).

For each run it plays episodes with the trained policy on the eval seeds and records, per
episode, whether the cue cell entered the agent's view (MiniGrid's own occluded view,
``agent_sees``) before the end, the outcome and the policy's features at the last step
(ThalamusPPO: the core's output features; LSTM-PPO: the actor LSTM's hidden state;
PPO: the actor's latent of the current observation). A linear probe (L2 logistic
regression) is then fit on half of the episodes that saw the cue and made a choice, and
scored on the other half: its held-out accuracy at decoding the cue type at the decision,
against the majority-class rate.

Then how long the cue survives in memory, and where: a probe per lag bin (steps since the
cue was last in view: 0, 1-2, 3-5, 6-10, 11-20, >20) on the features at every step after
the first sighting, fit and scored on different episodes; for ThalamusPPO the same on every
stream's readout (the control: what the current view shows) and outputs per feedback
iteration, the mean stream weights α per bin, and each stream's half-lives (median, p10,
p90, max over its heads, in env steps): parametric (at the learned ``dt`` bias) and in play
(at the ``dt`` its inputs gave it after the cue was seen). ``--no-lag`` skips these.

Examples::

    python scripts/diagnose_memory.py runs/benchmarks/full/MiniGrid-MemoryS11-v0__thalamus__2
    python scripts/diagnose_memory.py RUN_A RUN_B --episodes 500 --output diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from agents.experiment.config import ConfigError
from agents.experiment.memory_diagnosis import diagnose
from agents.experiment.model_files import TRUST_PICKLE_HELP

EXIT_CONFIG_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diagnose_memory.py",
        description=(
            "For trained agents on MiniGrid-Memory: how often they look at the cue, their "
            "success with and without having seen it, and a linear probe of the cue in the "
            "policy's features at the decision."
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_MODEL")
    parser.add_argument("--episodes", type=int, default=300, metavar="N", help="per run (300)")
    parser.add_argument("--env", metavar="ID", help="a MiniGrid-Memory env id (default: the run's)")
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="episode i resets with seed S+i (default: train.seed + 1000000, the eval seeds)",
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="take the most likely action (default: sample)"
    )
    parser.add_argument(
        "--no-lag",
        action="store_true",
        help="skip the cue probe by lag, per stream, and the half-lives (faster)",
    )
    parser.add_argument("--output", metavar="PATH", help="write all runs' results as JSON here")
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    return parser


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:5.2f}"


def lag_table(result: dict[str, Any]) -> list[str]:
    """The lines of a run's cue probe by lag, stream weights and half-lives (empty: none)."""
    report = result.get("lag_probe")
    lines = []
    if report:
        width = 12
        lines.append(
            f"  cue probe by steps since the cue was last in view ({report['episodes']} "
            "episodes that saw it): held-out accuracy (majority)"
        )
        decision = report["decision_lag"]
        lines.append(
            f"  lag at the last step: median {decision['median']:.0f}, p90 "
            f"{decision['p90']:.0f}, max {decision['max']}"
        )
        lines.append("  " + f"{'lag':<22}" + "".join(f"{b:>{width}}" for b in report["bins"]))
        first = next(iter(report["sets"].values()))
        counts = [f"{r['train_episodes']}/{r['test_episodes']}" for r in first]
        lines.append(
            "  " + f"{'episodes train/test':<22}" + "".join(f"{c:>{width}}" for c in counts)
        )
        steps = [f"{r['n_train']}/{r['n_test']}" for r in first]
        lines.append("  " + f"{'steps train/test':<22}" + "".join(f"{c:>{width}}" for c in steps))
        for name, rows in report["sets"].items():
            cells = [
                "-" if r["accuracy"] is None else f"{r['accuracy']:.2f} ({r['majority']:.2f})"
                for r in rows
            ]
            lines.append("  " + f"{name:<22}" + "".join(f"{c:>{width}}" for c in cells))
        for name, means in (result.get("stream_weights_by_lag") or {}).items():
            cells = ["-" if m is None else f"{m:.2f}" for m in means]
            lines.append("  " + f"{'α ' + name:<22}" + "".join(f"{c:>{width}}" for c in cells))
    for name, lives in (result.get("half_lives") or {}).items():
        if lives["kind"] == "episodic":
            text = f"episodic store of the last {lives['capacity']} steps (no decay)"
        else:
            clock = f", clock {lives['clock']}" if lives["clock"] > 1 else ""
            text = (
                f"median {lives['median']:.1f}, p10 {lives['p10']:.1f}, p90 {lives['p90']:.1f}, "
                f"max {lives['max']:.1f} ({lives['heads']} heads{clock})"
            )
        lines.append(f"  half-lives of {name} (env steps): {text}")
        for iteration, spread in (lives.get("in_play") or {}).items():
            lines.append(
                f"    in play, iteration {iteration} (first layer, steps after the cue was "
                f"seen): median {spread['median']:.1f}, p10 {spread['p10']:.1f}, "
                f"p90 {spread['p90']:.1f}, max {spread['max']:.1f}"
            )
    if result.get("streams_note"):
        lines.append(f"  note: {result['streams_note']}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.episodes < 1:
        print(f"error: --episodes = {args.episodes} must be >= 1", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    results = []
    print("success  cue seen  success|seen  success|unseen  probe acc (majority, n test)  run")
    for target in args.runs:
        try:
            result = diagnose(
                target,
                args.episodes,
                args.env,
                args.seed,
                args.deterministic,
                args.trust_pickle,
                by_lag=not args.no_lag,
            )
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        results.append(result)
        probe = result["probe"]
        probe_text = (
            f"{probe['accuracy']:.2f} ({probe['majority']:.2f}, {probe['n_test']})"
            if probe
            else f"- ({result['probe_episodes']} eligible episodes)"
        )
        print(
            f"{_fmt(result['success_rate'])}    {_fmt(result['cue_seen_rate'])}     "
            f"{_fmt(result['success_if_seen'])}          {_fmt(result['success_if_unseen'])}"
            f"        {probe_text:<28} {target}"
        )
        for line in lag_table(result):
            print(line)
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"json     {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
