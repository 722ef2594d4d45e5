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

from agents.config import ConfigError
from agents.model_files import TRUST_PICKLE_HELP

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
    from agents.callbacks import atomic_write_text
    from agents.training import EVAL_SEED_OFFSET, load_model
    from agents.video import run_episode, write_mp4

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
                    "reward": result.episode_return,
                    "length": result.length,
                    "success": result.success,
                    "video": video,
                    **({"attempts": result.attempts} if result.attempts else {}),
                }
            )
    except KeyboardInterrupt:
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
