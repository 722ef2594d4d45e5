"""scripts/train_agent.py end to end, resume, signals, bad configs, checkpoints, the guard."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch as th
import yaml
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import envs
from agents.experiment import training
from agents.experiment.callbacks import (
    NonFiniteGuard,
    NonFiniteTrainingError,
    PeriodicCheckpoint,
    PeriodicEval,
    SaveBestModel,
    best_model_reward,
)
from agents.experiment.config import DEFAULT_CONFIG, ConfigError, load_config
from agents.experiment.hints import script_command, tensorboard_command
from agents.experiment.io import (
    atomic_write_text,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)
from agents.experiment.model_files import load_model_file
from agents.experiment.training import (
    build_agent,
    train,
)
from tests.helpers import save_untrained_run

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "train_agent.py"
# A few hundred steps on 2 envs with 10-step episodes: every curve gets several points.
TINY = [
    "--n-envs=2",
    "--device=cpu",
    "ppo.n_steps=16",
    "ppo.batch_size=32",
    "ppo.n_epochs=1",
    "env.env_kwargs.max_steps=10",
    "thalamus.d_model=32",
    "thalamus.d_task=32",
    "thalamus.d_workspace=32",
    "thalamus.top_k=8",
    "train.eval_episodes=1",
    "train.eval_n_envs=1",
    "train.progress=log",
    "train.log_every_s=0.2",
]


def run_script(*args: str, runs_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args, f"train.runs_dir={runs_dir}"],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def only_run_dir(runs_dir: Path) -> Path:
    runs = list(runs_dir.iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar curve of the run's tensorboard folder, as TensorBoard shows it."""
    accumulator = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_default_agent_trains_end_to_end_into_a_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_script(
        *TINY,
        "--total-timesteps=64",
        "--seed=3",
        "train.eval_freq=32",
        "train.checkpoint_freq=32",
        "train.video=true",
        runs_dir=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    assert re.fullmatch(r"MiniGrid-DoorKey-5x5-v0__thalamus__3__\d{8}-\d{6}", run_dir.name)

    config = load_config(run_dir / "config.yaml", defaults_file=None)
    assert (config.agent.kind, config.train.seed, config.ppo.n_steps) == ("thalamus", 3, 16)

    curves = scalars(run_dir)
    for tag in ("rollout/ep_rew_mean", "rollout/success_rate", "eval/mean_reward",
                "eval/success_rate", "time/fps", "train/loss"):  # fmt: skip
        assert curves.get(tag), f"no {tag} in {sorted(curves)}"
    assert any(tag.startswith("thalamus/") for tag in curves)
    assert [step for step, _ in curves["eval/mean_reward"]] == [32, 64]
    accumulator = EventAccumulator(str(run_dir / "tb"))
    accumulator.Reload()
    assert "config/text_summary" in accumulator.Tags()["tensors"]
    assert [image.step for image in accumulator.Images("eval/video")] == [32, 64]
    assert accumulator.Images("eval/video")[0].encoded_image_string.startswith(b"GIF8")
    videos = sorted(p.name for p in (run_dir / "videos").iterdir())
    assert videos == ["eval_000000000032.mp4", "eval_000000000064.mp4"]

    assert (run_dir / "best_model.safetensors").is_file()
    model = load_model_file(run_dir / "final_model.safetensors", device="cpu")
    assert model.num_timesteps == 64
    obs = envs.make_vec_env(config.env.id, n_envs=1, seed=0).reset()
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (1,)

    checkpoints = list_checkpoints(run_dir / "checkpoints")
    assert [c.timesteps for c in checkpoints] == [32, 64]
    meta = checkpoints[-1].load_meta()
    assert meta["timesteps"] == 64 and {"python", "numpy", "torch"} <= set(meta["rng"])

    assert re.search(r"step 64/64 \| fps \d+ \| reward", result.stdout)  # plain log lines

    # The run directory before anything else, a first log line at once, a closing summary
    # whose commands run as printed (the venv's interpreter and tensorboard, not bare names).
    lines = result.stdout.splitlines()
    assert lines[0] == f"run directory: {run_dir}"
    assert lines[1].startswith("[  0.0%] step 0/64 | training started")
    summary = result.stdout[result.stdout.index("done: ") :]
    assert summary.startswith(f"done: {run_dir} (64 of 64 steps in ")
    assert "last evaluation  step 64: mean reward " in summary
    best = json.loads((run_dir / "best_model.json").read_text())
    assert (
        f"best model       {run_dir / 'best_model.safetensors'}: step {best['timesteps']},"
        in summary
    )
    monkeypatch.chdir(REPO)  # where the script ran: paths are shown relative to it
    videos_dir = run_dir / "videos"
    assert f"evaluate  {script_command('evaluate.py', run_dir, '--video-dir', videos_dir)}\n" in (
        summary
    )
    assert f"watch     {tensorboard_command(tmp_path)}\n" in summary
    resume = script_command("train_agent.py", "--resume", run_dir, "--total-timesteps", "128")
    assert f"train on  {resume}" in summary
    for command in ("evaluate", "watch", "train on"):
        line = next(x for x in summary.splitlines() if x.startswith(f"  {command}  "))
        program = Path(shlex.split(line[len(command) + 4 :])[0])
        assert program.is_absolute() or program.parts[0] != program.name, line  # a path
        assert os.access(REPO / program, os.X_OK), line


@pytest.mark.parametrize("agent", ["ppo", pytest.param("thalamus", marks=pytest.mark.slow)])
def test_resume_continues_the_counter_and_the_same_curve(tmp_path: Path, agent: str) -> None:
    first = run_script(
        *TINY, f"--agent={agent}", "--total-timesteps=64", "train.eval_freq=32", runs_dir=tmp_path
    )
    assert first.returncode == 0, first.stderr
    run_dir = only_run_dir(tmp_path)
    before = scalars(run_dir)

    second = subprocess.run(
        [sys.executable, str(SCRIPT), "--resume", str(run_dir), "--total-timesteps=128"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert second.returncode == 0, second.stderr
    assert "resuming" in second.stdout and "from step 64" in second.stdout
    assert only_run_dir(tmp_path) == run_dir  # no new run
    assert all(p.is_file() for p in (run_dir / "tb").iterdir())  # no new logger subfolder

    after = scalars(run_dir)
    for tag in ("rollout/ep_rew_mean", "time/fps", "eval/mean_reward"):
        steps = [step for step, _ in after[tag]]
        assert steps == sorted(set(steps)), f"{tag} is not one increasing curve: {steps}"
        assert steps[: len(before[tag])] == [step for step, _ in before[tag]]
        assert max(steps) == 128 and any(64 < step < 128 for step in steps)
    assert [step for step, _ in after["eval/mean_reward"]] == [32, 64, 96, 128]

    model = load_model_file(run_dir / "final_model.safetensors", device="cpu")
    assert model.num_timesteps == 128
    assert load_config(run_dir / "config.yaml", defaults_file=None).train.total_timesteps == 128

    refused = subprocess.run(
        [sys.executable, str(SCRIPT), "--resume", str(run_dir), "thalamus.top_k=4"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert refused.returncode == 2
    assert "thalamus.top_k=4" in refused.stderr and "cannot change a resumed run" in refused.stderr


# A run directory saved untrained (tests.helpers.save_untrained_run): enough for --resume's checks.
SMALL_RUN = ["env.n_envs=1", "ppo.n_steps=16", "ppo.batch_size=16", "thalamus.d_model=32"]


def _script_main() -> object:
    spec = importlib.util.spec_from_file_location("train_agent_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "0"], r"--seed cannot be combined with --resume"),
        (["--n-envs", "0"], r"--n-envs cannot be combined with --resume"),
        (["train.seed=3"], r"train\.seed=3.*cannot change a resumed run.*train\.seed stays"),
        (["train.runs_dir=/elsewhere"], r"train\.runs_dir stays what the run started with"),
        (["policy.core_lr_scale=1.0"], r"policy\.core_lr_scale=1\.0.*cannot change a resumed"),
        (["--print-config", "tokenizer.d_token=8"], r"tokenizer\.d_token=8.*cannot change"),
    ],
    ids=["seed-0-flag", "n-envs-0-flag", "train.seed", "train.runs_dir", "policy", "print"],
)
def test_resume_refuses_what_fixes_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], message: str
) -> None:
    run_dir = save_untrained_run(tmp_path, SMALL_RUN)
    assert _script_main()(["--resume", str(run_dir), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_resume_print_config_prints_the_resumed_config_and_trains_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run_dir = save_untrained_run(tmp_path, [*SMALL_RUN, "train.seed=5"])
    before = sorted(p.name for p in run_dir.iterdir())
    args = ["--resume", str(run_dir), "--print-config", "--total-timesteps=777",
            "ppo.learning_rate=0.0001", "thalamus_ppo.adaptive_lr_kl=0.01"]  # fmt: skip
    assert _script_main()(args) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["total_timesteps"] == 777 and printed["train"]["seed"] == 5
    assert printed["ppo"]["learning_rate"] == 0.0001
    assert printed["thalamus_ppo"]["adaptive_lr_kl"] == 0.01
    assert printed["thalamus"]["d_model"] == 32
    assert sorted(p.name for p in run_dir.iterdir()) == before  # config.yaml not rewritten
    saved = load_config(run_dir / "config.yaml", defaults_file=None)
    assert saved.train.total_timesteps != 777


def test_train_refuses_a_non_empty_run_dir_before_building_envs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "notes.txt").write_text("a user's file")

    def no_envs(config: object) -> None:
        raise AssertionError("envs were built for a run that cannot start")

    monkeypatch.setattr(training, "_make_envs", no_envs)
    config = load_config(DEFAULT_CONFIG, ["train.device=cpu"])
    with pytest.raises(ConfigError, match="exists and is not empty"):
        train(config, run_dir=tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ppo.n_step=64"], r"unknown key 'ppo\.n_step'.*Did you mean 'ppo\.n_steps'"),
        (["ppo.n_steps=many"], r"ppo\.n_steps = 'many'.*wrong type: expected int"),
        (["--env=MiniGrid-DoorKey-5x6-v0"], r"MiniGrid-DoorKey-5x6-v0.*MiniGrid-DoorKey-5x5-v0"),
    ],
    ids=["unknown-key", "wrong-type", "unknown-env"],
)
def test_bad_config_exits_before_training(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_script(*args, runs_dir=tmp_path / "runs", timeout=120)
    assert result.returncode == 2
    assert re.search(message, result.stderr), result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created, nothing was trained


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_a_checkpoint_and_exits_cleanly(
    tmp_path: Path, signum: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *TINY, "--agent=ppo", "--total-timesteps=1000000",
         "train.eval_freq=0", "train.checkpoint_freq=0", f"train.runs_dir={tmp_path}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )  # fmt: skip
    rollout = 2 * 16  # --n-envs=2 x ppo.n_steps=16 (TINY)
    try:
        assert process.stdout is not None
        # Wait for a progress line past the first rollout, however slow the machine is: a stop
        # checkpoints the start of the rollout it lands in, which is then step 32 or later (a
        # signal in the first rollout would rightly checkpoint step 0).
        for line in process.stdout:
            match = re.search(r"step ([\d,]+)/", line)
            if match and int(match.group(1).replace(",", "")) > rollout:
                break
        else:
            pytest.fail(f"the run ended before step {rollout}: {process.communicate()[1]}")
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    assert f"{signal.Signals(signum).name} received" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    run_dir = only_run_dir(tmp_path)
    monkeypatch.chdir(REPO)  # the command pastes: the script's interpreter, not `python`
    assert f"Continue with: {script_command('train_agent.py', '--resume', run_dir)}" in stderr
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    assert checkpoint is not None and checkpoint.timesteps >= rollout
    assert not (run_dir / "final_model.safetensors").exists()
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))


@pytest.fixture
def tiny_ppo() -> object:
    config = load_config(
        DEFAULT_CONFIG,
        ["agent.kind=ppo", "env.id=MiniGrid-Empty-5x5-v0", "env.n_envs=2", "train.device=cpu",
         "ppo.n_steps=16", "ppo.batch_size=32", "ppo.n_epochs=1"],
    )  # fmt: skip
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    model = build_agent(config, venv)  # carries its config: its checkpoints can be loaded
    model.set_logger(Logger(folder=None, output_formats=[]))  # no SB3-<time> folder in /tmp
    yield model
    venv.close()


def test_non_finite_parameters_stop_the_run_and_keep_the_last_good_checkpoint(
    tmp_path: Path, tiny_ppo: object
) -> None:
    class PoisonAfter64(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            if self.num_timesteps >= 64:
                with th.no_grad():
                    self.model.policy.action_net.weight.fill_(float("nan"))

    guard = NonFiniteGuard(hint=lambda: "HINT")
    checkpoint = PeriodicCheckpoint(tmp_path, save_freq=32)
    expected = r"action_net\.weight.*non-finite.*HINT"
    with pytest.raises(NonFiniteTrainingError, match=expected), guard.watching():
        tiny_ppo.learn(256, callback=[guard, checkpoint, PoisonAfter64()])
    last = latest_checkpoint(tmp_path)
    assert last is not None and last.timesteps == 32
    restored = load_model_file(last.model_path, device="cpu")
    assert all(th.isfinite(p).all() for p in restored.policy.parameters())


def test_non_finite_loss_is_reported_by_name(tiny_ppo: object) -> None:
    guard = NonFiniteGuard()
    guard.init_callback(tiny_ppo)
    guard.check()  # finite: nothing to say
    tiny_ppo.logger.record("train/value_loss", float("inf"))
    with pytest.raises(NonFiniteTrainingError, match=r"train/value_loss = inf"):
        guard.check()


def test_checkpoints_are_complete_only_with_their_sidecar_and_are_pruned(
    tmp_path: Path, tiny_ppo: object
) -> None:
    for steps in (10, 20, 30):
        tiny_ppo.num_timesteps = steps
        save_checkpoint(tiny_ppo, tmp_path, extra={"note": steps})
    (tmp_path / "step_000000000040.safetensors").write_bytes(b"torn")  # its JSON never came
    (tmp_path / ".step_000000000050.safetensors.x.tmp").write_bytes(b"")  # an interrupted save
    assert [c.timesteps for c in list_checkpoints(tmp_path)] == [10, 20, 30]
    assert json.loads((tmp_path / "step_000000000030.json").read_text())["extra"] == {"note": 30}

    keeper = PeriodicCheckpoint(tmp_path, save_freq=0, keep=2)
    keeper.init_callback(tiny_ppo)
    tiny_ppo.num_timesteps = 60
    keeper.save()
    assert [c.timesteps for c in list_checkpoints(tmp_path)] == [30, 60]
    loaded = load_model_file(latest_checkpoint(tmp_path).model_path, device="cpu")
    for a, b in zip(loaded.policy.parameters(), tiny_ppo.policy.parameters(), strict=True):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())


@pytest.mark.parametrize("agent", ["ppo", "thalamus"])
def test_evaluation_does_not_change_training(tmp_path: Path, agent: str) -> None:
    """Stochastic evaluation draws from a copy of the global RNGs: the same seed trains the
    same weights whether or not (and however often) the run evaluates."""
    overrides = [
        f"agent.kind={agent}",
        "env.n_envs=2",
        "train.device=cpu",
        "train.total_timesteps=96",
        "train.checkpoint_freq=0",
        "train.progress=none",
        "train.eval_episodes=2",
        "train.eval_deterministic=false",
        *(o for o in TINY if not o.startswith(("--", "train.progress", "train.log_every"))),
    ]
    weights = []
    for eval_freq in (0, 32):
        runs_dir = tmp_path / str(eval_freq)
        config = load_config(
            DEFAULT_CONFIG,
            [*overrides, f"train.eval_freq={eval_freq}", f"train.runs_dir={runs_dir}"],
        )
        run_dir = train(config)
        model = load_model_file(run_dir / "final_model.safetensors", device="cpu")
        weights.append(model.policy.state_dict())
    assert weights[0].keys() == weights[1].keys()
    for name, value in weights[0].items():
        assert th.equal(value, weights[1][name]), f"{name} differs once the run evaluates"


def test_eval_video_seeds_each_episode_by_its_step(
    tmp_path: Path, tiny_ppo: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resumed run (a new callback at a later step) records new layouts, not its first ones."""
    import agents.experiment.video
    from agents.experiment.callbacks import EvalVideo

    seeds: list[int] = []

    class Env:
        def close(self) -> None:
            pass

    def make_env(seed: int) -> Env:
        seeds.append(seed)
        return Env()

    frames = [np.zeros((8, 8, 3), dtype=np.uint8)] * 2
    monkeypatch.setattr(
        agents.experiment.video, "run_episode", lambda *a, **k: type("E", (), {"frames": frames})
    )
    monkeypatch.setattr(agents.experiment.video, "write_mp4", lambda *a, **k: None)
    for steps in (32, 64):  # one session, then a resumed one
        video = EvalVideo(make_env, tmp_path, seed=1000)
        video.init_callback(tiny_ppo)
        tiny_ppo.num_timesteps = steps
        video.on_step()
    assert seeds == [1032, 1064]


class _StopAt(BaseCallback):
    """Returns False (as StopOnSignal does after a signal) once ``num_timesteps >= at``."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def _on_step(self) -> bool:
        return self.num_timesteps < self.at


def test_a_stop_mid_rollout_checkpoints_the_steps_the_weights_learned_from(
    tmp_path: Path, tiny_ppo: object
) -> None:
    """2 envs x 16 steps: the second rollout is cut at step 40 and never trained on, so the
    end checkpoint (and a resume) counts 32 steps, not 40."""
    checkpoint = PeriodicCheckpoint(tmp_path, save_freq=0)
    tiny_ppo.learn(256, callback=[checkpoint, _StopAt(40)])
    assert tiny_ppo.num_timesteps == 32
    assert [c.timesteps for c in list_checkpoints(tmp_path)] == [32]


def _tiny_config(tmp_path: Path, *overrides: str):
    flags = [o for o in TINY if not o.startswith(("--", "train.progress", "train.log_every"))]
    return load_config(
        DEFAULT_CONFIG,
        ["agent.kind=ppo", "env.n_envs=2", "train.device=cpu", "train.progress=none",
         "train.total_timesteps=64", "train.checkpoint_freq=0", "train.eval_freq=0",
         f"train.runs_dir={tmp_path}", *flags, *overrides],
    )  # fmt: skip


def test_a_signal_during_the_last_update_still_finishes_the_run(tmp_path: Path) -> None:
    """The budget is trained when the signal lands after the last env step: the run writes
    final_model.safetensors and returns instead of asking for a resume that has nothing to do."""
    import os

    class SignalAtTheEnd(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            if self.model.num_timesteps >= 64:
                os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    run_dir = train(_tiny_config(tmp_path), extra_callbacks=lambda run: [SignalAtTheEnd()])
    assert (run_dir / "final_model.safetensors").exists()
    assert signal.getsignal(signal.SIGINT) is previous


def test_signal_handlers_are_restored_when_training_fails(tmp_path: Path) -> None:
    class Fail(BaseCallback):
        def _on_step(self) -> bool:
            raise RuntimeError("boom")

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(RuntimeError, match="boom"):
        train(_tiny_config(tmp_path), extra_callbacks=lambda run: [Fail()])
    assert {s: signal.getsignal(s) for s in previous} == previous


def test_atomic_files_get_the_umask_mode_not_a_private_one(tmp_path: Path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644


def test_a_resume_keeps_a_better_best_model_saved_after_its_checkpoint(
    tmp_path: Path, tiny_ppo: object
) -> None:
    """best_model.json records the saved model's reward; on resume the larger of it and the
    checkpoint's value is the bar a new best must clear."""
    path = tmp_path / "best_model.safetensors"
    evaluation = PeriodicEval(
        tiny_ppo.get_env(), eval_freq=32, callback_on_new_best=SaveBestModel(path)
    )
    evaluation.init_callback(tiny_ppo)
    evaluation.best_mean_reward = 0.22
    evaluation.callback_on_new_best.on_step()
    assert path.exists() and best_model_reward(path) == pytest.approx(0.22)

    resumed = PeriodicEval(tiny_ppo.get_env(), eval_freq=32)
    resumed.load_state({"best_mean_reward": 0.15}, best_on_disk=best_model_reward(path))
    assert resumed.best_mean_reward == pytest.approx(0.22)
    resumed.load_state({"best_mean_reward": 0.3}, best_on_disk=0.22)
    assert resumed.best_mean_reward == pytest.approx(0.3)
    assert best_model_reward(tmp_path / "missing.safetensors") is None


def test_overrides_the_agent_does_not_read_are_pointed_out(tmp_path: Path) -> None:
    result = run_script(
        "--agent=ppo", "thalamus.top_k=8", "ppo.n_steps=64", "--print-config", runs_dir=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "agent.kind=ppo does not read thalamus.top_k; it has no effect" in result.stderr
    quiet = run_script("--agent=thalamus", "thalamus.top_k=8", "--print-config", runs_dir=tmp_path)
    assert "does not read" not in quiet.stderr


def test_load_model_skips_a_final_model_the_run_was_resumed_past(
    tmp_path: Path, tiny_ppo: object
) -> None:
    import os

    run = save_untrained_run(tmp_path, ["agent.kind=ppo", "train.device=cpu"])
    final = run / "final_model.safetensors"
    assert training.load_model(run, device="cpu").model_path == final
    tiny_ppo.num_timesteps = 64
    later = save_checkpoint(tiny_ppo, run / "checkpoints")
    stamp = final.stat().st_mtime_ns
    os.utime(final, ns=(stamp, stamp))
    os.utime(later.model_path, ns=(stamp + 10**9, stamp + 10**9))
    assert training.load_model(run, device="cpu").model_path == later.model_path


def _without_torch(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing torch, stable-baselines3 or sb3-contrib fails."""
    shim = tmp_path / "shim"
    for name in ("torch", "stable_baselines3", "sb3_contrib"):
        (shim / name).mkdir(parents=True)
        (shim / name / "__init__.py").write_text(f"raise ImportError('{name} imported')\n")
    path = os.pathsep.join([str(shim), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "COLUMNS": "200"}


@pytest.mark.parametrize("flag", ["--help", "--help-config", "--print-config"])
def test_help_and_config_answer_without_importing_torch(tmp_path: Path, flag: str) -> None:
    """They answered after ~5 s of torch and SB3 imports; now nothing imports them (a torch
    made unimportable breaks nothing), and the lines fit a terminal (<= 100 wide)."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), flag],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=_without_torch(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    expected = {"--help": "usage: train_agent.py", "--help-config": "ppo.n_steps  int"}
    assert expected.get(flag, "env:\n  id: MiniGrid-DoorKey-5x5-v0") in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 100


def test_a_request_that_will_do_nothing_is_warned_about_before_training(tmp_path: Path) -> None:
    """``train.video=true`` records at evaluations; with none inside the budget it recorded
    nothing and said nothing."""
    result = run_script(
        "--total-timesteps=2048", "train.video=true", "--print-config", runs_dir=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING: no evaluation falls inside this run: train.eval_freq = 20,000" in (
        result.stderr
    )
    assert "train.video = true records no video; set train.eval_freq <= 2,048" in result.stderr
    quiet = run_script("--total-timesteps=20000", "train.video=true", "--print-config",
                       runs_dir=tmp_path)  # fmt: skip
    assert "WARNING" not in quiet.stderr
