#!/usr/bin/env python
"""Profile PPO iterations of an agent: rollout vs update, per module, and the top torch ops.

Example (docs/benchmarks/profile.md)::

    OMP_NUM_THREADS=1 python scripts/profile_iteration.py --env MiniGrid-DoorKey-5x5-v0 \\
        --iterations 3 --out docs/benchmarks/profile.md

The agent is built from the env's config file (``configs/``, over ``configs/defaults.yaml``)
plus ``--set`` overrides, exactly as ``scripts/train_agent.py`` builds it. One warm-up
iteration runs first. Then, per iteration:

* wall-clock of the rollout (``collect_rollouts``) and of the update (``train``);
* inside them, the time of each instrumented call (tokenizer, gate, workspace, stream readout,
  DistributedMamba, actor/critic heads, env stepping, the forward of an update minibatch, its
  backward, gradient clipping, the optimizer step). ``other`` is the rest of the phase (SB3's
  loop, buffer, tensor conversions, callbacks). Times are medians over the iterations;
* with ``--top-ops N``, one more iteration under ``torch.profiler``: the N torch ops with the
  most self CPU time in the rollout and in the update, and the number of ops per rollout step.

Timing hooks add a ``perf_counter`` per call (< 1 us); the profiler iteration is separate
because the profiler itself slows small ops down by ~2x.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agents.bench.records import git_commit  # noqa: E402
from agents.experiment.config import find_config_for_env, load_config  # noqa: E402
from agents.experiment.training import _build_vec_env, build_agent  # noqa: E402
from agents.registry import AGENT_KINDS, spec  # noqa: E402
from agents.runtime import tune_allocator  # noqa: E402

Timings = dict[str, float]


class Clock:
    """Accumulates seconds per label; :meth:`wrap` times every call of a callable."""

    def __init__(self) -> None:
        self.totals: Timings = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - start
                self.calls[label] += 1

        return timed

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()


def _patch(obj: Any, name: str, clock: Clock, label: str) -> None:
    """Replace ``obj.name`` (a bound method or a module's ``forward``) by a timed version."""
    setattr(obj, name, clock.wrap(label, getattr(obj, name)))


def instrument(model: Any, clock: Clock) -> None:
    """Time the phases and the modules of ``model`` (ThalamusPPO or an SB3 PPO/RecurrentPPO)."""
    _patch(model, "collect_rollouts", clock, "rollout")
    _patch(model, "train", clock, "update")
    env = model.env
    _patch(env, "step", clock, "rollout/env step")
    policy = model.policy
    if getattr(policy, "compile_core", False):
        # Timers inside a compiled core would break its graphs: phases only.
        _patch(policy, "evaluate_actions", clock, "update/forward")
        _patch(policy, "act", clock, "rollout/policy step")
    elif hasattr(policy, "core"):  # ThalamusPolicy
        core = policy.core
        _patch(policy.features_extractor.tokenizer, "forward", clock, "tokenizer")
        _patch(core.gate, "forward", clock, "gate")
        if core.workspace is not None:
            _patch(core.workspace, "forward", clock, "workspace")
        _patch(core.readout, "forward", clock, "stream readout")
        _patch(core.streams, "forward", clock, "DistributedMamba")
        _patch(core.streams, "step", clock, "DistributedMamba")
        _patch(policy, "_all_heads", clock, "heads")
        _patch(policy, "evaluate_actions", clock, "update/forward")
        _patch(policy, "act", clock, "rollout/policy step")
    else:
        _patch(policy, "evaluate_actions", clock, "update/forward")
        _patch(policy, "forward", clock, "rollout/policy step")
    optimizer = policy.optimizer
    _patch(optimizer, "step", clock, "update/optimizer step")


@contextlib.contextmanager
def patched_backward_and_clip(clock: Clock) -> Iterator[None]:
    """Time ``Tensor.backward`` and ``clip_grad_norm_`` (module-level functions)."""
    backward, clip = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
    torch.Tensor.backward = clock.wrap("update/backward", backward)  # type: ignore[method-assign]
    torch.nn.utils.clip_grad_norm_ = clock.wrap("update/clip grad norm", clip)
    try:
        yield
    finally:
        torch.Tensor.backward = backward  # type: ignore[method-assign]
        torch.nn.utils.clip_grad_norm_ = clip


def run_phases(model: Any, clock: Clock) -> tuple[Timings, Timings]:
    """One iteration with the rollout and the update timed apart."""
    clock.reset()
    model.collect_rollouts(
        model.env, model._callback_for_profile, model.rollout_buffer, model.n_steps
    )
    rollout = dict(clock.totals)
    clock.reset()
    model.train()
    update = dict(clock.totals)
    return rollout, update


def top_ops(model: Any, n: int) -> tuple[str, str, int]:
    """Profile one rollout and one update; tables of the top ``n`` ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    tables = []
    counts = []
    for phase in ("rollout", "update"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if phase == "rollout":
                model.collect_rollouts(
                    model.env, model._callback_for_profile, model.rollout_buffer, model.n_steps
                )
            else:
                model.train()
        events = prof.key_averages()
        counts.append(sum(e.count for e in events if e.key.startswith("aten::")))
        tables.append(
            events.table(sort_by="self_cpu_time_total", row_limit=n, max_name_column_width=40)
        )
    return tables[0], tables[1], counts[0]


def setup(env_id: str, agent: str, overrides: list[str]) -> Any:
    config_file = find_config_for_env(env_id)
    config = load_config(
        config_file,
        [f"env.id={env_id}", f"agent.kind={agent}", "train.eval_freq=0", *overrides],
    )
    env = _build_vec_env(config, config.env.n_envs, config.train.seed)
    model = build_agent(config, env)
    # SB3's learn() sets up the logger, the env's first reset and the callback; run one
    # iteration through it (the warm-up), then drive collect_rollouts / train directly.
    steps = model.n_steps * model.n_envs
    model.learn(steps, progress_bar=False)
    from stable_baselines3.common.callbacks import CallbackList

    callback = CallbackList([])
    callback.init_callback(model)
    model._callback_for_profile = callback
    return model, config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--env", default="MiniGrid-DoorKey-5x5-v0")
    parser.add_argument("--agent", default="thalamus", choices=AGENT_KINDS)
    parser.add_argument("--iterations", type=int, default=3, help="timed iterations (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--top-ops", type=int, default=15, help="0: no profiler iteration")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides, e.g. thalamus.n_iterations=2",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    tune_allocator()  # as training does (agents.experiment.training): same allocator, same costs
    model, config = setup(args.env, args.agent, args.set)
    clock = Clock()
    instrument(model, clock)
    rollouts: list[Timings] = []
    updates: list[Timings] = []
    with patched_backward_and_clip(clock):
        for _ in range(args.iterations):
            r, u = run_phases(model, clock)
            rollouts.append(r)
            updates.append(u)
    tables = top_ops(model, args.top_ops) if args.top_ops > 0 else None
    text = report(args, config, model, rollouts, updates, tables)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    model.env.close()
    return 0


def _median(rows: list[Timings], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in rows)


def report(
    args: Any,
    config: Any,
    model: Any,
    rollouts: list[Timings],
    updates: list[Timings],
    tables: tuple[str, str, int] | None,
) -> str:
    n_envs, n_steps = model.n_envs, model.n_steps
    steps = n_envs * n_steps
    rollout_s = _median(rollouts, "rollout")
    update_s = _median(updates, "update")
    total = rollout_s + update_s
    modules = ["tokenizer", "gate", "workspace", "stream readout", "DistributedMamba", "heads"]
    lines = [
        f"# One PPO iteration of `{args.agent}` on {args.env}, profiled",
        "",
        "Made by (re-run to refresh; numbers move with the machine's load, ratios less):",
        "",
        "```",
        "OMP_NUM_THREADS=1 python scripts/profile_iteration.py --env "
        f"{args.env} --agent {args.agent} --iterations {args.iterations} "
        f"--threads {args.threads} --top-ops {args.top_ops}"
        + (f" --set {' '.join(args.set)}" if args.set else "")
        + (f" --out {args.out}" if args.out else ""),
        "```",
        "",
        f"Commit {git_commit()}, {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {os.cpu_count()} CPUs (shared with other jobs). "
        f"{n_envs} envs x {n_steps} steps = {steps} env steps per iteration, batch "
        f"{model.batch_size}, {model.n_epochs} epochs"
        + (
            f", thalamus n_iterations {config.thalamus.n_iterations}"
            if "thalamus" in spec(args.agent).config_sections
            else ""
        )
        + f". Medians of {args.iterations} iterations after one warm-up.",
        "",
        f"Iteration: **{total:.2f} s** = rollout {rollout_s:.2f} s ({rollout_s / total:.0%}) + "
        f"update {update_s:.2f} s ({update_s / total:.0%}); "
        f"{steps / total:.0f} env steps/s of training.",
        "",
        "## Rollout",
        "",
        "| part | s per rollout | share | per env step (us) |",
        "|---|---|---|---|",
    ]

    def row(label: str, seconds: float, phase_s: float) -> str:
        return (
            f"| {label} | {seconds:.3f} | {seconds / phase_s:.0%} | {seconds / steps * 1e6:.0f} |"
        )

    policy = _median(rollouts, "rollout/policy step")
    env = _median(rollouts, "rollout/env step")
    accounted = 0.0
    for m in modules:
        v = _median(rollouts, m)
        if v:
            lines.append(row(f"policy: {m}", v, rollout_s))
            accounted += v
    lines.append(
        row(
            "policy: rest (ThalamusCore glue, distribution, sampling)",
            max(policy - accounted, 0.0),
            rollout_s,
        )
    )
    lines.append(row("env stepping (DummyVecEnv, wrappers, MiniGrid)", env, rollout_s))
    lines.append(
        row(
            "SB3 / ThalamusPPO loop (buffer, obs to tensor, callbacks, bootstrap)",
            max(rollout_s - policy - env, 0.0),
            rollout_s,
        )
    )
    lines += [
        "",
        f"Policy step: {policy / n_steps * 1e3:.2f} ms per step of {n_envs} envs.",
        "",
        "## Update",
        "",
        "| part | s per update | share | per env step per epoch (us) |",
        "|---|---|---|---|",
    ]
    per = steps * model.n_epochs

    def urow(label: str, seconds: float) -> str:
        return f"| {label} | {seconds:.3f} | {seconds / update_s:.0%} | {seconds / per * 1e6:.1f} |"

    fwd = _median(updates, "update/forward")
    accounted = 0.0
    for m in modules:
        v = _median(updates, m)
        if v:
            lines.append(urow(f"forward: {m}", v))
            accounted += v
    lines.append(urow("forward: rest (glue, distribution)", max(fwd - accounted, 0.0)))
    bwd = _median(updates, "update/backward")
    clip = _median(updates, "update/clip grad norm")
    opt = _median(updates, "update/optimizer step")
    lines.append(urow("backward (all modules)", bwd))
    lines.append(urow("clip_grad_norm_", clip))
    lines.append(urow("optimizer step", opt))
    lines.append(
        urow("PPO loss, minibatch slicing, logging", max(update_s - fwd - bwd - clip - opt, 0.0))
    )
    if tables is not None:
        rollout_table, update_table, rollout_ops = tables
        lines += [
            "",
            "## Top ops (torch.profiler, one more iteration; the profiler inflates small ops)",
            "",
            f"Rollout: {rollout_ops} aten ops in {n_steps} steps = "
            f"{rollout_ops / n_steps:.0f} per policy step (incl. nested ones).",
            "",
            "```",
            rollout_table.rstrip(),
            "```",
            "",
            "Update:",
            "",
            "```",
            update_table.rstrip(),
            "```",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
