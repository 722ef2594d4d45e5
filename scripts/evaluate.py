#!/usr/bin/env python
"""Evaluate a trained agent: a results table, a JSON file, and MP4 videos with the overlay.

Examples::

    python scripts/evaluate.py runs/MiniGrid-DoorKey-5x5-v0__thalamus__0__20250101-120000
    python scripts/evaluate.py RUN_DIR --episodes 50 --stochastic
    python scripts/evaluate.py RUN_DIR/best_model.safetensors --video-dir videos/ --video-every 5
    python scripts/evaluate.py RUN_DIR --video-dir videos/ --no-overlay
    python scripts/evaluate.py RUN_DIR --mission "go to the red ball"   # a wrong instruction

With a run directory the model is ``final_model.safetensors`` (else
``best_model.safetensors``, else the newest readable checkpoint; a final model older than the
latest checkpoint, left by a run resumed with a larger budget, is skipped); a model file
carries the config it was trained with. Loading never runs code from the file; a
stable-baselines3 ``.zip`` (an old run, or a model made elsewhere) is read only with
``--trust-pickle`` and the run's ``config.yaml`` beside it or one folder up.

Episode ``i`` is reset with seed ``--seed + i`` and torch is seeded with
``--seed``, so two evaluations with the same seed play the same layouts with the same
actions. Actions are sampled unless the run's ``train.eval_deterministic`` or
``--deterministic`` says otherwise: under argmax a MiniGrid policy often loops forever (an
unchanged view gives the same action).

On a trial env (a run with ``env.trial_episodes`` >= 2) an episode is a trial of several
attempts at one layout; the JSON then also holds each attempt's return, length and success,
and the success rate and mean reward per attempt index (does the agent do better on its
second attempt, with the first one's reward fed back?).

``--mission TEXT`` shows the agent TEXT in place of each episode's own mission, while the env
still judges success by its own: an agent that follows its instruction loses success, one that
ignores it keeps it (BabyAI's GoTo tasks: does the agent read the mission at all?).

Mission sensitivity is measured on every env whose missions differ between episodes: after the
episodes with their own missions, the same episodes (same seeds, torch reseeded) are played
again, each shown the mission of another episode (a seeded derangement,
:mod:`agents.experiment.mission_sensitivity`); the JSON's ``shuffled_mission`` holds that
success, and the table shows both. ``--no-shuffled-mission`` skips it (it doubles the episodes
played).

For the thalamus agent, ``--report-slots`` adds which kinds of tokens the gate kept (cells,
mission words, proprio; ``slots`` in the JSON), and ``--selection-test`` masks the gate's kept
tokens vs as many random valid tokens (``selection``: the KL of the action distribution from
the unmasked one at each step, and success with that masking at every step;
:mod:`agents.experiment.slots`).

Videos are recorded headless from ``render_mode="rgb_array"``; the overlay marks the cells
the thalamus gate selected at each step (brighter = more salient) and shows the mission, the
reward so far and the stream weights.

Torch runs with the run's ``train.torch_threads`` (``--threads N`` to change it): on a busy
2-core machine torch's default of one thread per core made 5 episodes take 37-47 s instead
of 6.5 s. ``--env`` other than the run's own env is allowed and warned about. Ctrl-C stops
after the episode in progress with one line, prints the finished episodes' results and
writes them to ``<output>-partial.json`` (a complete result is never replaced by a partial
one); the exit code is then 130.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from agents.experiment.config import ConfigError
from agents.experiment.model_files import TRUST_PICKLE_HELP

EXIT_CONFIG_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description=(
            "Run evaluation episodes of a trained agent, print mean/std reward, success rate "
            "and episode length, write them as JSON, and optionally record MP4 videos."
        ),
    )
    parser.add_argument(
        "target", metavar="RUN_DIR_OR_MODEL", help="run directory or model .safetensors file"
    )
    parser.add_argument("--trust-pickle", action="store_true", help=TRUST_PICKLE_HELP)
    parser.add_argument("--episodes", type=int, default=20, metavar="N", help="episodes (20)")
    parser.add_argument("--env", metavar="ID", help="env id (default: the run's env.id)")
    parser.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="episode i resets with seed S+i (default: train.seed + 1000000, the eval seeds)",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--deterministic",
        dest="deterministic",
        action="store_true",
        default=None,
        help="take the most likely action",
    )
    mode.add_argument(
        "--stochastic",
        dest="deterministic",
        action="store_false",
        help="sample actions (torch seeded with --seed, so reruns repeat)",
    )
    parser.add_argument("--video-dir", metavar="DIR", help="write episode_<i>.mp4 files here")
    parser.add_argument(
        "--video-every",
        type=int,
        default=1,
        metavar="N",
        help="record every N-th episode (1: all)",
    )
    parser.add_argument(
        "--no-overlay", action="store_true", help="plain renders, without the thalamus overlay"
    )
    parser.add_argument("--fps", type=int, metavar="F", help="video frame rate (train.video_fps)")
    parser.add_argument(
        "--output",
        metavar="FILE",
        help="results JSON (default: in the run directory, evaluation.json for the run's own "
        "model, env, action mode and missions, evaluation-<what differs>.json otherwise)",
    )
    parser.add_argument(
        "--mission",
        metavar="TEXT",
        help="show the agent this mission instead of the env's own (success is still the env's)",
    )
    parser.add_argument(
        "--no-shuffled-mission",
        action="store_true",
        help="skip the replay of the episodes with shuffled missions (mission sensitivity)",
    )
    parser.add_argument(
        "--report-slots",
        action="store_true",
        help="thalamus agent: report the kinds of tokens (cells, words, proprio) the gate kept",
    )
    parser.add_argument(
        "--selection-test",
        action="store_true",
        help="thalamus agent: mask the gate's kept tokens vs as many random ones (KL, success)",
    )
    parser.add_argument("--device", default="auto", help="torch device (auto)")
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch threads (default: the run's train.torch_threads, else torch's default)",
    )
    return parser


def _attempt_summary(episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attempt index of a trial env: how many trials reached it, their success rate and
    mean reward (empty for plain episodes). A trial cut short has fewer attempts."""
    rows = []
    for k in range(max((len(e.get("attempts", [])) for e in episodes), default=0)):
        played = [e["attempts"][k] for e in episodes if len(e.get("attempts", [])) > k]
        rows.append(
            {
                "attempt": k + 1,
                "episodes": len(played),
                "success_rate": float(np.mean([a["success"] for a in played])),
                "mean_reward": float(np.mean([a["return"] for a in played])),
            }
        )
    return rows


def default_output(
    run_dir: Path,
    model_path: Path,
    env_id: str,
    run_env_id: str,
    deterministic: bool,
    run_deterministic: bool,
    mission: str | None,
) -> Path:
    """``evaluation.json`` in the run directory for the default evaluation (the run's model,
    env and action mode, its own missions); each other setting gets its own file, so that
    evaluating ``best_model.zip`` or a wrong mission does not replace the plain result:
    ``evaluation-best_model-stochastic-mission-go-to-the-red-ball.json``."""
    parts = []
    if model_path.stem != "final_model":
        parts.append(model_path.stem)
    if env_id != run_env_id:
        parts.append(env_id)
    if deterministic != run_deterministic:
        parts.append("deterministic" if deterministic else "stochastic")
    if mission is not None:
        parts.append("mission-" + ("-".join(re.findall(r"[a-z0-9]+", mission.lower())) or "none"))
    return run_dir / ("-".join(["evaluation", *parts]) + ".json")


def _extra_evaluations(
    model: Any, env: Any, args: argparse.Namespace, episodes: list[dict[str, Any]], seed: int
) -> dict[str, Any]:
    """The optional evaluations after the main episodes: shuffled missions (unless
    ``--mission`` or ``--no-shuffled-mission``), slots by kind, the selection test."""
    import torch as th

    from agents.experiment.mission_sensitivity import (
        find_mission_wrapper,
        shuffled_mission_episodes,
    )
    from agents.experiment.slots import selection_test, slot_report
    from agents.registry import spec_of_model

    jobs: list[tuple[str, Any]] = []
    missions = [e["mission"] for e in episodes]
    if (
        args.mission is None
        and not args.no_shuffled_mission
        and find_mission_wrapper(env) is not None
        and len(set(missions)) > 1
    ):

        def shuffled() -> dict[str, Any]:
            th.manual_seed(seed)
            replays, summary = shuffled_mission_episodes(
                model, env, [e["seed"] for e in episodes], missions, args.deterministic, seed
            )
            return {**summary, "per_episode": replays}

        jobs.append(("shuffled_mission", shuffled))
    shows_gate = spec_of_model(model).shows_gate
    for flag, name, function in (
        ("report_slots", "slots", slot_report),
        ("selection_test", "selection", selection_test),
    ):
        if getattr(args, flag):
            if not shows_gate:
                print(f"note: --{flag.replace('_', '-')} needs the thalamus agent; skipped")
                continue
            jobs.append(
                (name, lambda f=function: f(model, env, len(episodes), seed, args.deterministic))
            )
    extras: dict[str, Any] = {}
    for name, job in jobs:
        try:
            extras[name] = job()
        except Exception as exc:  # the main episodes' results are still written
            message = f"{type(exc).__name__}: {exc}"
            print(f"warning: the {name} evaluation failed ({message})", file=sys.stderr)
            extras[name] = {"error": message}
    return extras


def _print_extras(summary: dict[str, Any]) -> None:
    """The table rows of :func:`_extra_evaluations`' results."""
    shuffled = summary.get("shuffled_mission")
    if shuffled is not None and "error" not in shuffled:
        print(
            f"shuffled {shuffled['success_rate']:.3f} success, reward "
            f"{shuffled['mean_reward']:.3f}, length {shuffled['mean_length']:.1f} with another "
            "episode's mission "
            f"({shuffled['distinct_missions']} distinct missions; "
            f"{shuffled['same_text']} episodes shown their own text)"
        )
    slots = summary.get("slots")
    if slots is not None and "error" not in slots:
        kinds = ", ".join(
            f"{kind} {slots[kind]['mean']:.2f} [{slots[kind]['p10']:.2f}-{slots[kind]['p90']:.2f}]"
            for kind in ("cell", "word", "proprio")
        )
        print(f"slots    of the {slots['top_k']} kept: {kinds} (mean [p10-p90] over steps)")
    selection = summary.get("selection")
    if selection is not None and selection.get("kl_kept") is not None:
        success = selection["success"]
        print(
            f"masking  KL from unmasked: kept {selection['kl_kept']:.4f}, random "
            f"{selection['kl_random']:.4f} (kept larger at {selection['kept_hurts_more']:.2f} "
            f"of {selection['steps']} steps); success none {success['none']:.3f}, kept "
            f"{success['kept']:.3f}, random {success['random']:.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    """Evaluate as the command line says; a Ctrl-C anywhere is one line and exit code 130."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C) before any result was written", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("episodes", "video_every", "fps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} = {value} must be >= 1", file=sys.stderr)
            return EXIT_CONFIG_ERROR

    import torch as th

    import envs
    from agents.experiment.io import atomic_write_text
    from agents.experiment.training import (
        EVAL_SEED_OFFSET,
        load_model,
    )
    from agents.experiment.video import run_episode, write_mp4

    try:
        model, config, model_path, run_dir = load_model(
            args.target, device=args.device, trust_pickle=args.trust_pickle
        )
        env_id = args.env or config.env.id
        envs.check_env_id(env_id)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR

    if env_id != config.env.id:
        print(
            f"WARNING: the model was trained on {config.env.id}; evaluating it on {env_id} "
            "measures how it transfers, not how well it learned its task",
            file=sys.stderr,
            flush=True,
        )
    threads = args.threads if args.threads is not None else config.train.torch_threads
    if threads is not None:
        th.set_num_threads(threads)
    seed = args.seed if args.seed is not None else config.train.seed + EVAL_SEED_OFFSET
    if args.deterministic is None:  # as the run evaluated itself during training
        args.deterministic = config.train.eval_deterministic
    th.manual_seed(seed)  # sampled actions repeat from run to run
    fps = args.fps or config.train.video_fps
    video_dir = Path(args.video_dir) if args.video_dir else None
    output = (
        Path(args.output)
        if args.output
        else default_output(
            run_dir,
            model_path,
            env_id,
            config.env.id,
            args.deterministic,
            config.train.eval_deterministic,
            args.mission,
        )
    )
    try:
        env = envs.make_env(
            env_id,
            render_mode="rgb_array" if video_dir is not None else None,
            trial_episodes=config.env.trial_episodes,
            mission=args.mission,
            **config.env.env_kwargs,
        )
    except (ValueError, TypeError) as exc:  # TypeError: env kwargs this env does not take
        kwargs = (
            f" (env.env_kwargs: {dict(config.env.env_kwargs)})" if config.env.env_kwargs else ""
        )
        print(f"error: cannot make {env_id}{kwargs}: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    episodes: list[dict[str, Any]] = []
    extras: dict[str, Any] = {}
    interrupted = False
    try:
        for i in range(args.episodes):
            record = video_dir is not None and i % args.video_every == 0
            frames = ("plain" if args.no_overlay else "overlay") if record else "none"
            result = run_episode(
                model, env, deterministic=args.deterministic, frames=frames, seed=seed + i
            )
            video = None
            if record:
                video = str(write_mp4(video_dir / f"episode_{i:03d}.mp4", result.frames, fps))
            episodes.append(
                {
                    "seed": seed + i,
                    "mission": getattr(env.unwrapped, "mission", None),
                    "reward": result.episode_return,
                    "length": result.length,
                    "success": result.success,
                    "video": video,
                    **({"attempts": result.attempts} if result.attempts else {}),
                }
            )
        extras = _extra_evaluations(model, env, args, episodes, seed)
    except KeyboardInterrupt:  # the finished episodes are kept; the extras need all of them
        interrupted = True
    finally:
        env.close()
    if interrupted:
        print(
            f"interrupted (Ctrl-C) after {len(episodes)} of {args.episodes} episodes"
            + ("; their results:" if episodes else "; nothing written"),
            file=sys.stderr,
            flush=True,
        )
        if not episodes:
            return EXIT_INTERRUPTED
        output = output.with_name(f"{output.stem}-partial{output.suffix}")

    rewards = np.array([e["reward"] for e in episodes])
    lengths = np.array([e["length"] for e in episodes])
    summary = {
        "model": str(model_path),
        "env_id": env_id,
        "agent": config.agent.kind,
        "episodes": len(episodes),
        **({"interrupted": True, "episodes_requested": args.episodes} if interrupted else {}),
        "deterministic": args.deterministic,
        "torch_threads": th.get_num_threads(),
        "seed": seed,
        "mission": args.mission,
        "mean_reward": float(rewards.mean()),
        "std_reward": float(rewards.std()),
        "success_rate": float(np.mean([e["success"] for e in episodes])),
        "mean_length": float(lengths.mean()),
        "std_length": float(lengths.std()),
        **({"attempts": by_attempt} if (by_attempt := _attempt_summary(episodes)) else {}),
        **extras,
        "per_episode": episodes,
    }
    atomic_write_text(output, json.dumps(summary, indent=2) + "\n")

    policy = "deterministic" if args.deterministic else "stochastic"
    print(f"model    {model_path}")
    seeds = f"seeds {seed}..{seed + len(episodes) - 1}"
    print(f"env      {env_id}, {len(episodes)} episodes ({policy}, {seeds})")
    if args.mission is not None:
        print(f"mission  {args.mission!r} shown in place of each episode's own")
    print(f"reward   {summary['mean_reward']:.3f} +/- {summary['std_reward']:.3f}")
    print(f"success  {summary['success_rate']:.3f}")
    _print_extras(summary)
    print(f"length   {summary['mean_length']:.1f} +/- {summary['std_length']:.1f}")
    for row in summary.get("attempts", []):
        print(
            f"attempt {row['attempt']}: success {row['success_rate']:.3f}, reward "
            f"{row['mean_reward']:.3f} ({row['episodes']} trials reached it)"
        )
    if video_dir is not None:
        n_videos = sum(e["video"] is not None for e in episodes)
        print(f"videos   {n_videos} in {video_dir}")
    print(f"json     {output}")
    return EXIT_INTERRUPTED if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
