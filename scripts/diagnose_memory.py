#!/usr/bin/env python
"""Why does an agent fail MiniGrid-Memory? Does it look at the cue, and does its state hold it?

MiniGrid-MemoryS<N> starts the agent in or east of the start room, facing east, away from
the cue object (a key or a ball in the room's north-west corner). To succeed it must turn
back and look at the cue, walk the hallway and go to the matching object at the split.
A success rate near 0.5 can mean two different failures: the agent never looks at the cue
(an exploration failure, memory never gets tested), or it looks but its state does not hold
the cue at the split (a memory failure). This script tells them apart.

For each run it plays episodes with the trained policy on the eval seeds and records, per
episode, whether the cue cell entered the agent's view (MiniGrid's own occluded view,
``agent_sees``) before the end, the outcome and the policy's features at the last step
(ThalamusPPO: the core's output features; LSTM-PPO: the actor LSTM's hidden state;
PPO: the actor's latent of the current observation). A linear probe (L2 logistic
regression) is then fit on half of the episodes that saw the cue and made a choice, and
scored on the other half: its held-out accuracy at decoding the cue type at the decision,
against the majority-class rate.

Examples::

    python scripts/diagnose_memory.py runs/benchmarks/full/MiniGrid-MemoryS11-v0__thalamus__2
    python scripts/diagnose_memory.py RUN_A RUN_B --episodes 500 --output diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.experiment.config import ConfigError
from agents.experiment.model_files import TRUST_PICKLE_HELP

EXIT_CONFIG_ERROR = 2
MIN_PROBE_EPISODES = 20
"""Fewer eligible episodes than this and the probe is not fit (its accuracy would be noise)."""
PROBE_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class MemoryEpisode:
    """One episode of a Memory env.

    :param cue: ``"key"`` or ``"ball"``, the object in the start room.
    :param cue_seen: the cue cell was in the agent's occluded view at some step.
    :param first_seen_step: the step index at which it was first seen (``None``: never).
    :param outcome: ``"success"``, ``"failure"`` (the other object) or ``"timeout"``.
    :param length: steps taken.
    :param start_x: the agent's start column (the start room is columns 1-3).
    """

    cue: str
    cue_seen: bool
    first_seen_step: int | None
    outcome: str
    length: int
    start_x: int


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
    parser.add_argument("--output", metavar="PATH", help="write all runs' results as JSON here")
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    return parser


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy of an L2 logistic-regression probe of ``labels`` from ``features``.

    The episodes are split in half at random (``seed``); the L2 weight is chosen on a 3:1
    split of the training half, the probe refit on the whole half and scored on the other.

    :param features: ``[N, F]`` float features.
    :param labels: ``[N]`` bool labels.
    :return: ``accuracy``, ``majority`` (the test half's majority-class rate), ``n_train``,
        ``n_test`` and the chosen ``l2``.
    """
    import torch as th

    x = th.as_tensor(features, dtype=th.float64)
    y = th.as_tensor(labels, dtype=th.float64)
    perm = th.randperm(len(x), generator=th.Generator().manual_seed(seed))
    train, test = perm[: len(x) // 2], perm[len(x) // 2 :]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std

    def fit(ids: th.Tensor, l2: float) -> tuple[th.Tensor, th.Tensor]:
        w = th.zeros(x.shape[1], dtype=th.float64, requires_grad=True)
        b = th.zeros(1, dtype=th.float64, requires_grad=True)
        opt = th.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> th.Tensor:
            opt.zero_grad()
            logits = x[ids] @ w + b
            loss = th.nn.functional.binary_cross_entropy_with_logits(logits, y[ids])
            loss = loss + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    def accuracy(ids: th.Tensor, w: th.Tensor, b: th.Tensor) -> float:
        return float(((x[ids] @ w + b > 0).double() == y[ids]).double().mean())

    inner = len(train) * 3 // 4
    scores = [(accuracy(train[inner:], *fit(train[:inner], l2)), l2) for l2 in PROBE_L2_GRID]
    l2 = max(scores)[1]  # best inner accuracy; ties go to the stronger L2 (the larger)
    w, b = fit(train, l2)
    share = float(y[test].mean())
    return {
        "accuracy": accuracy(test, w, b),
        "majority": max(share, 1.0 - share),
        "n_train": len(train),
        "n_test": len(test),
        "l2": l2,
    }


def play(model: Any, env: Any, seed: int, deterministic: bool) -> tuple[MemoryEpisode, np.ndarray]:
    """Play one episode; return it and the policy's features ``[F]`` at its last step."""
    from agents.experiment.rollout import play_episode

    grid = env.unwrapped
    layout: dict[str, Any] = {}  # read at the first step, from the episode's reset
    first_seen: list[int] = []

    def watch_cue(episode: Any, _obs: Any, _step: Any) -> None:
        if not layout:
            layout["cue_cell"] = (1, grid.height // 2 - 1)
            layout["cue"] = grid.grid.get(*layout["cue_cell"]).type
            layout["start_x"] = int(grid.agent_pos[0])
        if not first_seen and grid.agent_sees(*layout["cue_cell"]):
            first_seen.append(episode.length)

    episode = play_episode(
        model, env, deterministic=deterministic, seed=seed, with_features=True, on_step=watch_cue
    )
    if episode.episode_return > 0:
        outcome = "success"
    else:
        outcome = "failure" if episode.terminated else "timeout"
    seen_at = first_seen[0] if first_seen else None
    row = MemoryEpisode(
        layout["cue"], seen_at is not None, seen_at, outcome, episode.length, layout["start_x"]
    )
    assert episode.last_step is not None and episode.last_step.features is not None
    return row, np.asarray(episode.last_step.features, dtype=np.float64).copy()


def _rate(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def diagnose(
    target: str,
    episodes: int,
    env_id: str | None,
    seed: int | None,
    deterministic: bool,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Play ``episodes`` of one run and summarise them (see the module doc).

    ``trust_pickle`` also reads stable-baselines3 zips, which runs code from them.

    :raises ConfigError: the run cannot be loaded or the env is not a MiniGrid-Memory env.
    """
    import torch as th
    from minigrid.envs import MemoryEnv

    import envs
    from agents.experiment.training import (
        EVAL_SEED_OFFSET,
        load_model,
    )

    model, config, model_path, _ = load_model(target, device="cpu", trust_pickle=trust_pickle)
    env_id = env_id or config.env.id
    if config.env.trial_episodes != 1:
        raise ConfigError(f"{target} was trained on trials; this diagnosis needs plain episodes")
    try:
        env = envs.make_env(env_id, **config.env.env_kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not isinstance(env.unwrapped, MemoryEnv):
        env.close()
        raise ConfigError(
            f"{env_id} is not a MiniGrid-Memory env; pass --env MiniGrid-MemoryS7-v0 (or S9, "
            "S11, S13, S17)"
        )
    seed = seed if seed is not None else config.train.seed + EVAL_SEED_OFFSET
    model.policy.set_training_mode(False)
    th.manual_seed(seed)
    played = []
    try:
        for i in range(episodes):
            played.append(play(model, env, seed + i, deterministic))
    finally:
        env.close()

    rows = [episode for episode, _ in played]
    success = [e.outcome == "success" for e in rows]
    seen = [e.cue_seen for e in rows]
    eligible = [i for i, e in enumerate(rows) if e.cue_seen and e.outcome != "timeout"]
    probe: dict[str, Any] | None = None
    if len(eligible) >= MIN_PROBE_EPISODES:
        features = np.stack([played[i][1] for i in eligible])
        labels = np.array([rows[i].cue == "key" for i in eligible])
        probe = fit_probe(features, labels, seed=seed)
    return {
        "model": str(model_path),
        "env_id": env_id,
        "agent": config.agent.kind,
        "episodes": episodes,
        "deterministic": deterministic,
        "seed": seed,
        "success_rate": float(np.mean(success)),
        "cue_seen_rate": float(np.mean(seen)),
        "success_if_seen": _rate([s for s, v in zip(success, seen, strict=True) if v]),
        "success_if_unseen": _rate([s for s, v in zip(success, seen, strict=True) if not v]),
        "timeout_rate": float(np.mean([e.outcome == "timeout" for e in rows])),
        "mean_length": float(np.mean([e.length for e in rows])),
        "probe_episodes": len(eligible),
        "probe": probe,
        "per_episode": [asdict(e) for e in rows],
    }


def _fmt(value: float | None) -> str:
    return "  -  " if value is None else f"{value:5.2f}"


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
                target, args.episodes, args.env, args.seed, args.deterministic, args.trust_pickle
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
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(results, indent=2) + "\n")
        print(f"json     {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
