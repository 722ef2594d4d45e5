"""One agent of an alternated speed benchmark, driven over stdin/stdout (:mod:`agents.bench.speed`).

Run as a script by :class:`agents.bench.speed.Worker`, with ``PYTHONPATH`` set to the checkout whose
code is measured: it imports only what every commit since the config system has
(``load_config`` and ``build_agent``, from ``agents.experiment`` or, before it, ``agents``), so
the same file drives the current code and an older checkout side by side (before/after ratios
in one run).

Protocol: one JSON object per line each way.

* ``{"cmd": "init", "env": id, "agent": kind, "threads": n, "seed": s, "overrides": [...]}``
  builds the agent from the env's config file and runs one warm-up update; answers
  ``{"steps_per_update": n_envs * n_steps, "init_seconds": s}`` (``s`` includes the
  warm-up, so a compiled core's compile time).
* ``{"cmd": "train", "updates": k}`` trains ``k`` more updates (rollout + update); answers
  ``{"seconds": wall, "cpu_seconds": process CPU time, "steps": env steps}``.
* ``{"cmd": "eval", "episodes": n}`` evaluates (stochastic actions, own eval envs); answers
  ``{"mean_reward": r}``. Not timed as training.
* ``{"cmd": "quit"}`` closes the envs and exits.

Errors answer ``{"error": "<type>: <message>"}`` and the worker exits.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any


def _init(msg: dict[str, Any]) -> tuple[Any, Any, int]:
    import torch

    torch.set_num_threads(int(msg["threads"]))
    try:  # keep freed activations as training does; without it the thalamus' big
        # activations are page-faulted in again every update and look dearer than in a run
        from agents.runtime import tune_allocator
    except ImportError:  # a checkout from before the allocator tuning
        pass
    else:
        tune_allocator()
    try:
        from agents.experiment.config import find_config_for_env, load_config
        from agents.experiment.training import _build_vec_env, build_agent, make_eval_env
    except ModuleNotFoundError:  # a checkout from before agents/experiment/ (issue 33)
        from agents.config import find_config_for_env, load_config  # type: ignore[no-redef]
        from agents.training import (  # type: ignore[no-redef]
            _build_vec_env,
            build_agent,
            make_eval_env,
        )

    env_id = msg["env"]
    config = load_config(
        find_config_for_env(env_id),
        [
            f"env.id={env_id}",
            f"agent.kind={msg['agent']}",
            f"train.seed={int(msg['seed'])}",
            f"train.torch_threads={int(msg['threads'])}",
            *msg.get("overrides", []),
        ],
    )
    env = _build_vec_env(config, config.env.n_envs, config.train.seed)
    model = build_agent(config, env)
    steps = model.n_steps * model.n_envs
    model.learn(steps, progress_bar=False)  # warm-up: allocator, first-call costs
    return model, (lambda: make_eval_env(config)), steps


def serve(stdin: Any = sys.stdin, stdout: Any = sys.stdout) -> None:
    """Answer the driver's commands until ``quit`` or end of input."""
    model = None
    eval_env = None
    make_eval = None
    steps_per_update = 0
    for line in stdin:
        msg = json.loads(line)
        cmd = msg["cmd"]
        try:
            if cmd == "init":
                start = time.perf_counter()
                model, make_eval, steps_per_update = _init(msg)
                reply: dict[str, Any] = {
                    "steps_per_update": steps_per_update,
                    "init_seconds": time.perf_counter() - start,
                }
            elif cmd == "train":
                assert model is not None, "init first"
                steps = int(msg["updates"]) * steps_per_update
                wall, cpu = time.perf_counter(), time.process_time()
                model.learn(steps, reset_num_timesteps=False, progress_bar=False)
                reply = {
                    "seconds": time.perf_counter() - wall,
                    "cpu_seconds": time.process_time() - cpu,
                    "steps": steps,
                }
            elif cmd == "eval":
                assert model is not None and make_eval is not None, "init first"
                from stable_baselines3.common.evaluation import evaluate_policy

                if eval_env is None:
                    eval_env = make_eval()
                rewards, _ = evaluate_policy(
                    model,
                    eval_env,
                    n_eval_episodes=int(msg["episodes"]),
                    deterministic=False,
                    return_episode_rewards=True,
                    warn=False,
                )
                reply = {"mean_reward": float(sum(rewards) / len(rewards))}
            elif cmd == "quit":
                break
            else:
                reply = {"error": f"ValueError: unknown command {cmd!r}"}
        except Exception as exc:  # the driver reports it and stops this worker
            traceback.print_exc(file=sys.stderr)
            stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
            stdout.flush()
            break
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    for env in (getattr(model, "env", None), eval_env):
        if env is not None:
            env.close()


if __name__ == "__main__":
    # Run as a file: drop this folder from the path so that its modules (config.py, ...) can
    # never shadow a top-level import; `agents` comes from PYTHONPATH.
    sys.path.pop(0)
    serve()
