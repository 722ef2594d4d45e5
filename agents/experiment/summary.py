"""What ``scripts/train_agent.py`` prints when a run ends: the closing summary.

- :class:`EvalRecorder` keeps each evaluation's step, mean reward and success rate (it is
  an extra callback of :func:`agents.experiment.training.train`, see ``ExtraCallbacks``).
- :func:`closing_summary` turns them into the lines printed when training ends or stops: the
  last evaluation, the best model, and the commands to evaluate, watch and resume the run,
  spelled with this process' interpreter (:mod:`agents.experiment.hints`) so they paste as printed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from stable_baselines3.common.callbacks import BaseCallback

from agents.constants import MODEL_SUFFIX
from agents.experiment.hints import script_command, shell_path, tensorboard_command

if TYPE_CHECKING:
    from agents.experiment.callbacks import PeriodicEval
    from agents.experiment.config import ExperimentConfig

__all__ = ["EvalRecord", "EvalRecorder", "closing_summary"]


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation during training.

    :ivar timesteps: env steps trained when it ran.
    :ivar mean_reward: mean episode reward.
    :ivar success_rate: fraction of successful episodes (None when the env does not say).
    :ivar episodes: episodes played.
    """

    timesteps: int
    mean_reward: float
    success_rate: float | None
    episodes: int


class EvalRecorder(BaseCallback):
    """Keep every evaluation of ``evaluation`` (a
    :class:`~agents.experiment.callbacks.PeriodicEval`) in :attr:`records`; runs after it in the
    same step.

    :param evaluation: the run's evaluation callback (None: the run does not evaluate).
    """

    def __init__(self, evaluation: PeriodicEval | None) -> None:
        super().__init__()
        self.evaluation = evaluation
        self.records: list[EvalRecord] = []
        self.final_timesteps: int | None = None

    def _on_step(self) -> bool:
        evaluation = self.evaluation
        if evaluation is not None and evaluation.n_evaluations > len(self.records):
            self.records.append(
                EvalRecord(
                    int(evaluation.last_eval_timesteps or self.num_timesteps),
                    float(evaluation.last_mean_reward),
                    evaluation.last_success_rate,
                    int(evaluation.n_eval_episodes),
                )
            )
        return True

    def _on_training_end(self) -> None:
        # After the checkpoint callback, which sets the count back to the rollout start when
        # the run stopped in the middle of one: the steps the saved weights learned from.
        self.final_timesteps = int(self.model.num_timesteps)


def _best_model(run_dir: Path, records: list[EvalRecord]) -> tuple[int, float] | None:
    """Step and mean reward of ``best_model.safetensors``: from its JSON record (it may come
    from before a resume), else the first best of ``records`` (the one the run saved)."""
    try:
        meta = json.loads((run_dir / "best_model.json").read_text())
        return int(meta["timesteps"]), float(meta["mean_reward"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    if not records:
        return None
    best = max(records, key=lambda r: r.mean_reward)  # max keeps the first of equals, as saved
    return best.timesteps, best.mean_reward


def _success(rate: float | None) -> str:
    return "" if rate is None else f", success {rate:.2f}"


def closing_summary(
    run_dir: Path,
    config: ExperimentConfig,
    records: list[EvalRecord],
    *,
    timesteps: int,
    seconds: float | None = None,
    interrupted: bool = False,
) -> str:
    """The lines printed when a run ends (or stops on a signal).

    :param run_dir: the run directory.
    :param config: the run's config.
    :param records: the evaluations of this session (:class:`EvalRecorder`).
    :param timesteps: env steps trained at the end.
    :param seconds: wall time of this session, shown when given.
    :param interrupted: the run stopped before ``train.total_timesteps``.
    """
    total = config.train.total_timesteps
    took = ""
    if seconds is not None and math.isfinite(seconds):
        minutes, secs = divmod(round(seconds), 60)
        took = f" in {minutes // 60}:{minutes % 60:02d}:{secs:02d}"
    head = "stopped" if interrupted else "done"
    lines = [f"{head}: {shell_path(run_dir)} ({timesteps:,} of {total:,} steps{took})"]
    if records:
        last = records[-1]
        text = (
            f"  last evaluation  step {last.timesteps:,}: mean reward {last.mean_reward:.3f}"
            f"{_success(last.success_rate)} ({last.episodes} episode{'s' * (last.episodes != 1)})"
        )
        if last.timesteps != timesteps and not interrupted:
            text += f"; none at step {timesteps:,}: evaluate the final model as below"
        lines.append(text)
    elif config.train.eval_freq == 0:
        lines.append("  no evaluation    train.eval_freq = 0; evaluate it as below")
    else:
        lines.append(
            f"  no evaluation    none fell in this session (train.eval_freq = "
            f"{config.train.eval_freq:,}); evaluate it as below"
        )
    best = _best_model(run_dir, records)
    best_model, final_model = (
        run_dir / f"{n}{MODEL_SUFFIX}" for n in ("best_model", "final_model")
    )
    if best is not None and best_model.is_file():
        lines.append(
            f"  best model       {shell_path(best_model)}: step {best[0]:,}, "
            f"mean reward {best[1]:.3f}"
        )
    if not interrupted and final_model.is_file():
        lines.append(f"  final model      {shell_path(final_model)}")
    lines.append("next:")
    lines.append(
        "  evaluate  " + script_command("evaluate.py", run_dir, "--video-dir", run_dir / "videos")
    )
    lines.append("  watch     " + tensorboard_command(run_dir.parent))
    if interrupted:
        lines.append("  resume    " + script_command("train_agent.py", "--resume", run_dir))
    else:
        lines.append(
            "  train on  "
            + script_command(
                "train_agent.py", "--resume", run_dir, "--total-timesteps", str(2 * total)
            )
        )
    return "\n".join(lines)
