"""Why does an agent fail MiniGrid-Memory? Does it look at the cue, and does its state hold it?

MiniGrid-MemoryS<N> starts the agent in or east of the start room, facing east, away from
the cue object (a key or a ball in the room's north-west corner). To succeed it must turn
back and look at the cue, walk the hallway and go to the matching object at the split.
A success rate near 0.5 can mean two different failures: the agent never looks at the cue
(an exploration failure, memory never gets tested), or it looks but its state does not hold
the cue at the split (a memory failure). :func:`diagnose` tells them apart.

It plays episodes with the trained policy on the eval seeds and records, per episode,
whether the cue cell entered the agent's view (MiniGrid's own occluded view, ``agent_sees``)
before the end, the outcome and the policy's features at the last step (ThalamusPPO: the
core's output features; LSTM-PPO: the actor LSTM's hidden state; PPO: the actor's latent of
the current observation). A linear probe (L2 logistic regression) is then fit on half of the
episodes that saw the cue and made a choice, and scored on the other half: its held-out
accuracy at decoding the cue type at the decision, against the majority-class rate.

``scripts/diagnose_memory.py`` is the command line; the benchmark runner records
:func:`summarize` of it for every run on a Memory env (``memory_diagnosis`` in the record).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.experiment.config import ConfigError, ExperimentConfig

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


def is_memory_env(env: Any) -> bool:
    """Whether ``env`` (any wrapping) is a MiniGrid-Memory env (``MemoryEnv`` or a subclass)."""
    from minigrid.envs import MemoryEnv

    return isinstance(env.unwrapped, MemoryEnv)


def diagnose(
    target: str | Path | tuple[Any, ExperimentConfig],
    episodes: int,
    env_id: str | None,
    seed: int | None,
    deterministic: bool,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Play ``episodes`` of one run and summarise them (see the module doc).

    :param target: a run directory or model file (loaded on the CPU), or an already-loaded
        ``(model, config)`` (the benchmark runner's final model; then ``"model"`` is None).
    :param env_id: a MiniGrid-Memory env id; None: the run's own (``config.env.id``).
    :param seed: episode ``i`` resets with ``seed + i``; None: ``train.seed`` plus
        :data:`~agents.experiment.training.EVAL_SEED_OFFSET` (the eval seeds).
    :param trust_pickle: also read stable-baselines3 zips, which runs code from them.
    :raises ConfigError: the run cannot be loaded, was trained on trials, or the env is not a
        MiniGrid-Memory env.
    """
    import torch as th

    import envs
    from agents.experiment.training import EVAL_SEED_OFFSET, load_model

    model_path: Path | None
    if isinstance(target, tuple):
        model, config = target
        model_path, name = None, f"the {config.agent.kind} model on {config.env.id}"
    else:
        model, config, model_path, _ = load_model(target, device="cpu", trust_pickle=trust_pickle)
        name = str(target)
    env_id = env_id or config.env.id
    if config.env.trial_episodes != 1:
        raise ConfigError(f"{name} was trained on trials; this diagnosis needs plain episodes")
    try:
        env = envs.make_env(env_id, **config.env.env_kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not is_memory_env(env):
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
        "model": None if model_path is None else str(model_path),
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


SUMMARY_KEYS = (
    "episodes",
    "success_rate",
    "cue_seen_rate",
    "success_if_seen",
    "success_if_unseen",
    "probe_episodes",
    "probe_accuracy",
    "probe_majority",
)
"""What :func:`summarize` keeps of a diagnosis (the benchmark record's ``memory_diagnosis``)."""


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The compact form of a :func:`diagnose` result: :data:`SUMMARY_KEYS`, no per-episode list.

    ``probe_accuracy`` and ``probe_majority`` are None when the probe was not fit (fewer than
    :data:`MIN_PROBE_EPISODES` episodes saw the cue and made a choice).
    """
    probe = result["probe"] or {}
    summary = {key: result[key] for key in SUMMARY_KEYS[:6]}
    summary["probe_accuracy"] = probe.get("accuracy")
    summary["probe_majority"] = probe.get("majority")
    return summary
