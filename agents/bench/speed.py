"""Alternated speed benchmark: training throughput and time to threshold, agents side by side.

The suites of :mod:`agents.bench.runner` train each run on its own, so two runs' fps come from
different moments of a machine whose speed changes with its load (and from day to day). Here
every measured *cell* (an agent on an env, at a number of torch threads, from a checkout) is a
worker process (:mod:`agents.bench.speed_worker`), and the driver lets one worker at a time train a
few updates, round after round, rotating the order each round. Ratios are taken within a round
(every cell of a round sees the same load) and reported as medians over rounds.

* :func:`measure_fps`: ``rounds`` rounds of ``updates`` PPO updates per cell.
* :func:`time_to_threshold`: every cell trains ``eval_every`` updates per round, then is
  evaluated (not timed); a cell stops once its stochastic eval reward reaches the threshold.
  Its training seconds up to then are its time to threshold.

A cell's ``repo`` may be another checkout (e.g. a ``git worktree`` of an older commit): its
worker imports that checkout's code, so a before/after ratio is measured in one run too.

Command line: ``python scripts/benchmark.py --alternated fps`` (see ``--help``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "Cell",
    "SPEED_ENVS",
    "SPEED_AGENTS",
    "Worker",
    "measure_fps",
    "time_to_threshold",
    "fps_markdown",
    "threshold_markdown",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).resolve().parent / "speed_worker.py"

#: The envs of the alternated speed suite (issue 34): no memory, memory, language.
SPEED_ENVS: tuple[str, ...] = (
    "MiniGrid-DoorKey-5x5-v0",
    "MiniGrid-MemoryS7-v0",
    "BabyAI-GoToLocal-v0",
)
#: Its agents, each at its default config for the env.
SPEED_AGENTS: tuple[str, ...] = ("thalamus", "lstm", "ppo")


def split_overrides(text: str) -> tuple[str, ...]:
    """Split ``KEY=VALUE,KEY=VALUE`` at the commas outside brackets, braces and quotes.

    A value may be an OmegaConf flow-style list or mapping whose own commas belong to it, such
    as a stream list for ``thalamus.streams``.

    >>> split_overrides("ppo.n_epochs=4,thalamus.top_k=8")
    ('ppo.n_epochs=4', 'thalamus.top_k=8')
    >>> split_overrides("thalamus.streams=[{name: visual}, {name: slow, clock: 4}],train.seed=1")
    ('thalamus.streams=[{name: visual}, {name: slow, clock: 4}]', 'train.seed=1')

    :raises ValueError: a bracket or quote is left open or closed twice (the message names it).
    """
    parts: list[str] = []
    depth, quote, start = 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
            if depth < 0:
                raise ValueError(f"{text!r}: {char!r} at position {i} closes nothing")
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if depth or quote:
        raise ValueError(f"{text!r}: a bracket or quote is left open; close it")
    parts.append(text[start:].strip())
    return tuple(part for part in parts if part)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One measured configuration.

    :param env: env id (its config file in ``configs/`` is used, as by ``train_agent.py``).
    :param agent: ``agent.kind``.
    :param threads: torch threads of the worker.
    :param label: the row name (default: the agent kind, plus ``@<repo name>`` for a repo).
    :param repo: checkout whose code the worker imports (None: this one).
    :param seed: ``train.seed``.
    :param overrides: more dotted config overrides.
    """

    env: str
    agent: str
    threads: int = 1
    label: str = ""
    repo: Path | None = None
    seed: int = 0
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        return self.agent if self.repo is None else f"{self.agent}@{Path(self.repo).name}"


class Worker:
    """A :mod:`agents.bench.speed_worker` process training one cell on request."""

    def __init__(self, cell: Cell, python: str = sys.executable) -> None:
        repo = Path(cell.repo).resolve() if cell.repo is not None else REPO_ROOT
        trainers = (repo / "agents" / "experiment" / "training.py", repo / "agents" / "training.py")
        if not any(path.is_file() for path in trainers):  # the second: before issue 33's layout
            raise ValueError(
                f"cell {cell.name!r}: {repo} is not a thalamus_rl checkout (no "
                "agents/experiment/training.py or agents/training.py); pass the root of one, "
                "e.g. a `git worktree add` of it"
            )
        env = dict(os.environ)
        env["PYTHONPATH"] = str(repo)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(cell.threads)
        self.cell = cell
        self.process = subprocess.Popen(
            [python, str(WORKER)],
            cwd=repo,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        reply = self.ask(
            cmd="init",
            env=cell.env,
            agent=cell.agent,
            threads=cell.threads,
            seed=cell.seed,
            overrides=list(cell.overrides),
        )
        self.steps_per_update = int(reply["steps_per_update"])
        #: Seconds to build the agent and train its warm-up update (compilation included).
        self.init_seconds = float(reply.get("init_seconds", float("nan")))

    def ask(self, **msg: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(msg) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"cell {self.cell.name!r} ({self.cell.env}): the worker exited "
                f"(code {self.process.wait()}); its traceback is on stderr above"
            )
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"cell {self.cell.name!r} ({self.cell.env}): {reply['error']}")
        return reply

    def close(self) -> None:
        """Ask the worker to quit (it closes its envs); kill it if it has not within 30 s."""
        if self.process.poll() is None:
            with contextlib.suppress(BrokenPipeError, OSError):
                assert self.process.stdin is not None
                self.process.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(cells: Sequence[Cell], python: str) -> list[Worker]:
    workers: list[Worker] = []
    try:
        for cell in cells:
            workers.append(Worker(cell, python))
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers


def measure_fps(
    cells: Sequence[Cell],
    rounds: int = 5,
    updates: int = 2,
    python: str = sys.executable,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Training fps of every cell, alternated within each (env, threads) group.

    Groups run one after the other, so only one group's workers are alive at a time (each
    holds an agent and its envs, ~0.5 GB). In a group, workers start (and warm up) one after
    the other; then in round ``r`` its cells train ``updates`` updates each, one at a time,
    in their order rotated by ``r``. Ratios are meaningful within a group only.

    :return: ``{"cells": [cell dicts], "init_seconds": [per cell], "rounds": [[{"seconds",
        "cpu_seconds", "steps"}] per cell] per round}`` (cell order as given; round ``r`` of
        different groups ran at different times).
    """
    if rounds < 1 or updates < 1:
        raise ValueError(f"rounds={rounds} and updates={updates} must be >= 1")
    results: list[list[dict[str, Any] | None]] = [[None] * len(cells) for _ in range(rounds)]
    init_seconds = [float("nan")] * len(cells)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, c in enumerate(cells):
        groups.setdefault((c.env, c.threads), []).append(i)
    for members in groups.values():
        workers = _start([cells[i] for i in members], python)
        try:
            for i, w in zip(members, workers, strict=True):
                init_seconds[i] = w.init_seconds
            for r in range(rounds):
                for k in range(len(members)):
                    j = (k + r) % len(members)
                    i = members[j]
                    reply = workers[j].ask(cmd="train", updates=updates)
                    results[r][i] = reply
                    log(
                        f"round {r + 1}/{rounds} {cells[i].env} {cells[i].name} "
                        f"{cells[i].threads}t: {reply['steps'] / reply['seconds']:.0f} fps"
                    )
        finally:
            for w in workers:
                w.close()
    return {
        "cells": [_cell_dict(c) for c in cells],
        "init_seconds": init_seconds,
        "rounds": results,
    }


def time_to_threshold(
    cells: Sequence[Cell],
    threshold: float = 0.9,
    eval_every: int = 5,
    eval_episodes: int = 20,
    budget_updates: int = 100,
    python: str = sys.executable,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Training seconds until each cell's stochastic eval mean reward reaches ``threshold``.

    Round robin: every cell still below the threshold trains ``eval_every`` updates (timed),
    then plays ``eval_episodes`` (not timed). A cell stops at the threshold or after
    ``budget_updates`` updates.

    :return: ``{"cells": [...], "reached": [{"seconds", "steps", "updates"} or None per cell],
        "curves": [[{"updates", "seconds", "mean_reward"}] per cell]}``.
    """
    workers = _start(cells, python)
    curves: list[list[dict[str, Any]]] = [[] for _ in cells]
    reached: list[dict[str, Any] | None] = [None] * len(cells)
    seconds = [0.0] * len(cells)
    done_updates = [0] * len(cells)
    try:
        r = 0
        while True:
            active = [
                i
                for i in range(len(cells))
                if reached[i] is None and done_updates[i] < budget_updates
            ]
            if not active:
                break
            for k in range(len(active)):
                i = active[(k + r) % len(active)]
                n = min(eval_every, budget_updates - done_updates[i])
                seconds[i] += workers[i].ask(cmd="train", updates=n)["seconds"]
                done_updates[i] += n
                reward = workers[i].ask(cmd="eval", episodes=eval_episodes)["mean_reward"]
                curves[i].append(
                    {"updates": done_updates[i], "seconds": seconds[i], "mean_reward": reward}
                )
                log(
                    f"{cells[i].name}: {done_updates[i]} updates, {seconds[i]:.0f} s, "
                    f"eval reward {reward:.3f}"
                )
                if reward >= threshold:
                    reached[i] = {
                        "seconds": seconds[i],
                        "updates": done_updates[i],
                        "steps": done_updates[i] * workers[i].steps_per_update,
                    }
            r += 1
    finally:
        for w in workers:
            w.close()
    return {
        "cells": [_cell_dict(c) for c in cells],
        "threshold": threshold,
        "reached": reached,
        "curves": curves,
    }


def _cell_dict(cell: Cell) -> dict[str, Any]:
    d = dataclasses.asdict(cell)
    d["name"] = cell.name
    d["repo"] = None if cell.repo is None else str(cell.repo)
    d["overrides"] = list(cell.overrides)
    return d


def _groups(cells: Sequence[dict[str, Any]]) -> dict[tuple[str, int], list[int]]:
    groups: dict[tuple[str, int], list[int]] = {}
    for i, c in enumerate(cells):
        groups.setdefault((c["env"], c["threads"]), []).append(i)
    return groups


def fps_ratios(result: dict[str, Any], numerator: int, denominator: int) -> list[float]:
    """Per round, fps of cell ``numerator`` / fps of cell ``denominator``."""
    out = []
    for row in result["rounds"]:
        a, b = row[numerator], row[denominator]
        out.append((a["steps"] / a["seconds"]) / (b["steps"] / b["seconds"]))
    return out


def _med_range(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    return (
        f"{fmt.format(statistics.median(values))} "
        f"({fmt.format(min(values))}-{fmt.format(max(values))})"
    )


def fps_markdown(result: dict[str, Any], baselines: Sequence[str] = ("lstm", "ppo")) -> str:
    """Tables of :func:`measure_fps`: per env and thread count, each cell's median fps (range
    over rounds), CPU share (process CPU / wall), the seconds its worker took to start and train
    its warm-up update (a compiled core's compilation), and its per-round ratio to every
    baseline."""
    cells = result["cells"]
    lines: list[str] = []
    for (env, threads), idx in _groups(cells).items():
        present = [b for b in baselines if any(cells[i]["name"] == b for i in idx)]
        header = "| agent | fps, median (range) | CPU / wall | start + warm-up s |" + "".join(
            f" / {b}, median (range) |" for b in present
        )
        lines += [
            f"**{env}, {threads} thread{'s' if threads > 1 else ''} per run**",
            "",
            header,
            "|---" * (4 + len(present)) + "|",
        ]
        for i in idx:
            fps = [row[i]["steps"] / row[i]["seconds"] for row in result["rounds"]]
            cpu = [row[i]["cpu_seconds"] / row[i]["seconds"] for row in result["rounds"]]
            init = result.get("init_seconds", [float("nan")] * len(cells))[i]
            cols = [
                cells[i]["name"],
                _med_range(fps, "{:.0f}"),
                f"{statistics.median(cpu):.2f}",
                f"{init:.0f}",
            ]
            for b in present:
                j = next(k for k in idx if cells[k]["name"] == b)
                cols.append(_med_range(fps_ratios(result, i, j)) + "x" if i != j else "1")
            lines.append("| " + " | ".join(cols) + " |")
        lines.append("")
    return "\n".join(lines)


def threshold_markdown(result: dict[str, Any], baseline: str = "ppo") -> str:
    """The table of :func:`time_to_threshold`."""
    cells, reached = result["cells"], result["reached"]
    base = next((r for c, r in zip(cells, reached, strict=True) if c["name"] == baseline), None)
    lines = [
        f"| agent | env steps to {result['threshold']} | training s | / {baseline} |",
        "|---|---|---|---|",
    ]
    for c, r in zip(cells, reached, strict=True):
        if r is None:
            last = result["curves"][cells.index(c)][-1]
            lines.append(
                f"| {c['name']} | not reached in {last['updates']} updates "
                f"(last eval {last['mean_reward']:.2f}) | > {last['seconds']:.0f} | |"
            )
            continue
        ratio = f"{r['seconds'] / base['seconds']:.2f}x" if base is not None else ""
        lines.append(f"| {c['name']} | {r['steps']} | {r['seconds']:.0f} | {ratio} |")
    return "\n".join(lines) + "\n"
