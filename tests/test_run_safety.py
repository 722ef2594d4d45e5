"""A run directory survives what users and machines do to it (issue 32): edited or emptied
config files, signals during saves and updates, corrupt or pruned checkpoints, a full disk,
two writers, and resumes that must keep every tensorboard point."""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch as th
from stable_baselines3.common.callbacks import BaseCallback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import agents.experiment.callbacks
import agents.experiment.io
import agents.experiment.training
from agents.experiment.callbacks import NonFiniteTrainingError
from agents.experiment.config import DEFAULT_CONFIG, ConfigError, ExperimentConfig, load_config
from agents.experiment.io import (
    DiskFullError,
    RunLockedError,
    list_checkpoints,
    save_checkpoint,
)
from agents.experiment.model_files import load_model_file
from agents.experiment.training import (
    TrainingInterrupted,
    load_model,
    resume,
    train,
)

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "agent.kind=ppo",
    "env.n_envs=2",
    "ppo.n_steps=16",
    "ppo.batch_size=32",
    "ppo.n_epochs=1",
    "env.env_kwargs.max_steps=10",
    "train.total_timesteps=64",
    "train.checkpoint_freq=32",
    "train.eval_freq=0",
    "train.device=cpu",
    "train.progress=none",
]
THALAMUS = [
    "agent.kind=thalamus",
    "thalamus.d_model=32",
    "thalamus.d_task=32",
    "thalamus.d_workspace=32",
    "thalamus.top_k=8",
]


def tiny_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    return load_config(DEFAULT_CONFIG, [*TINY, f"train.runs_dir={tmp_path}", *overrides])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PPO run of 64 steps with checkpoints at 32 and 64 (copy it before changing it)."""
    root = tmp_path_factory.mktemp("trained")
    return train(tiny_config(root), root / "run")


@pytest.fixture
def run(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def scalar_steps(run: Path, tag: str) -> list[int]:
    events = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.step for event in events.Scalars(tag)]


@pytest.fixture
def sigterm_kills() -> Iterator[None]:
    """SIGTERM's handler outside training raises, standing in for the default (death): code
    that lets a signal through mid-save fails the test instead of killing pytest."""

    class Killed(Exception):
        pass

    def die(signum: int, frame: object) -> None:
        raise Killed("the process would have died here")

    previous = signal.signal(signal.SIGTERM, die)
    yield
    signal.signal(signal.SIGTERM, previous)


# --------------------------------------------------------------------------------------
# Rows 2, 3, 10: a checkpoint carries its config; config.yaml must agree with it
# --------------------------------------------------------------------------------------


def test_an_empty_or_cut_config_yaml_is_refused_and_a_missing_one_is_restored(run: Path) -> None:
    config_yaml = run / "config.yaml"
    original = config_yaml.read_text()
    config_yaml.write_text("")
    with pytest.raises(ConfigError, match=r"config\.yaml is empty.*delete .*written back"):
        resume(run, total_timesteps=96)
    config_yaml.write_text(original[: len(original) // 2].rsplit("\n", 2)[0] + "\n")
    with pytest.raises(ConfigError, match=r"config\.yaml is incomplete: it has no .*train"):
        resume(run, total_timesteps=96)
    config_yaml.unlink()
    resume(run, total_timesteps=96)
    assert config_yaml.read_text() != ""
    restored = load_config(config_yaml, defaults_file=None)
    assert (restored.env.n_envs, restored.train.total_timesteps) == (2, 96)


def test_config_yaml_edits_of_keys_that_fix_the_run_are_refused_naming_both_values(
    tmp_path: Path,
) -> None:
    run = train(tiny_config(tmp_path, *THALAMUS), tmp_path / "run")
    text = (run / "config.yaml").read_text()
    edited = (
        text.replace("id: MiniGrid-DoorKey-5x5-v0", "id: MiniGrid-Empty-5x5-v0")
        .replace("n_envs: 2", "n_envs: 4")
        .replace("top_k: 8", "top_k: 4")
    )
    assert edited.count("Empty-5x5") == 1 and "top_k: 4" in edited
    (run / "config.yaml").write_text(edited)
    with pytest.raises(ConfigError) as refused:
        resume(run, total_timesteps=96)
    message = str(refused.value)
    for named in (
        "env.id = 'MiniGrid-Empty-5x5-v0' in config.yaml, 'MiniGrid-DoorKey-5x5-v0' in the "
        "checkpoint",
        "env.n_envs = 4 in config.yaml, 2 in the checkpoint",
        "thalamus.top_k = 4 in config.yaml, 8 in the checkpoint",
        "start a new run",
    ):
        assert named in message
    assert (run / "config.yaml").read_text() == edited  # nothing was written


def test_a_failed_resume_keeps_its_overrides_out_of_config_yaml(run: Path) -> None:
    class Poison(BaseCallback):
        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            with th.no_grad():
                self.model.policy.action_net.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteTrainingError):
        resume(
            run,
            ["ppo.learning_rate=1000000.0"],
            total_timesteps=128,
            extra_callbacks=lambda callbacks: [Poison()],
        )
    config = load_config(run / "config.yaml", defaults_file=None)
    assert config.ppo.learning_rate != 1e6 and config.train.total_timesteps == 64
    started, ended = history(run)[-2:]
    assert started["event"] == "resume" and started["from_step"] == 64
    assert started["overrides"] == ["ppo.learning_rate=1000000.0", "train.total_timesteps=128"]
    assert ended["event"] == "end" and "NonFiniteTrainingError" in ended["outcome"]

    resume(run, total_timesteps=96)  # a plain resume trains at the run's own rate
    assert load_model_file(run / "final_model.safetensors").num_timesteps == 96
    assert load_config(run / "config.yaml", defaults_file=None).train.total_timesteps == 96
    assert history(run)[-1]["outcome"] == "done"


# --------------------------------------------------------------------------------------
# Rows 4, 5, 8, 9, 11: no lost work at the edges
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", ["end checkpoint", "final model"])
def test_a_signal_during_a_save_finishes_the_save_then_the_run(
    tmp_path: Path,
    sigterm_kills: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    save: str,
) -> None:
    module, name = (
        (agents.experiment.callbacks, "save_checkpoint")
        if save == "end checkpoint"
        else (agents.experiment.training, "atomic_save_model")
    )
    real = getattr(module, name)

    def signalled(model: object, *args: object, **kwargs: object) -> object:
        if model.num_timesteps == 64:
            signal.raise_signal(signal.SIGTERM)  # lands as the save starts
        return real(model, *args, **kwargs)

    monkeypatch.setattr(module, name, signalled)
    run = train(tiny_config(tmp_path), tmp_path / "run")
    assert load_model_file(run / "final_model.safetensors").num_timesteps == 64
    assert [c.timesteps for c in list_checkpoints(run / "checkpoints")] == [32, 64]
    assert "SIGTERM received after the last update" in capsys.readouterr().err
    assert not list(run.rglob("*.tmp"))


def test_temp_files_of_interrupted_saves_are_removed_at_the_next_start(run: Path) -> None:
    stale = [
        run / ".final_model.safetensors.k2j3.tmp",
        run / "checkpoints" / ".step_000000000096.safetensors.x8a.tmp",
        run / "checkpoints" / ".step_000000000096.json.q1.tmp",
    ]
    for path in stale:
        path.write_bytes(b"half a save")
    (run / "notes.tmp").write_text("not ours")
    resume(run, total_timesteps=96)
    assert not any(path.exists() for path in stale)
    assert (run / "notes.tmp").exists()


@pytest.mark.parametrize("damage", ["truncated model", "overwritten model", "truncated sidecar"])
def test_a_corrupt_latest_checkpoint_is_skipped_with_a_warning(
    run: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    older, latest = list_checkpoints(run / "checkpoints")
    if damage == "truncated model":
        latest.model_path.write_bytes(latest.model_path.read_bytes()[:1000])
    elif damage == "overwritten model":
        shutil.copyfile(older.model_path, latest.model_path)
    else:
        latest.meta_path.write_text(latest.meta_path.read_text()[:40])
    resume(run, total_timesteps=96)
    out = capsys.readouterr()
    assert f"skipping checkpoint {latest.model_path}" in out.err
    assert "resuming" in out.out and "from step 32" in out.out


def _evaluate_main() -> ModuleType:
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts/evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.main


def test_evaluate_names_a_corrupt_model_file_in_one_line(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    final = run / "final_model.safetensors"
    final.write_bytes(final.read_bytes()[:5000])
    assert _evaluate_main()([str(run), "--episodes=1", "--device=cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(final) in err and "Traceback" not in err
    final.write_bytes(b"")
    assert _evaluate_main()([str(final), "--episodes=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(final) in err


def test_loading_a_run_while_its_checkpoint_is_pruned_lists_again(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Row 9: load_model(RUN) during training with keep_checkpoints=1 raised FileNotFoundError
    for a checkpoint pruned between listing and reading."""
    for name in ("final_model.safetensors", "best_model.safetensors"):
        (run / name).unlink(missing_ok=True)
    older, latest = list_checkpoints(run / "checkpoints")
    real = agents.experiment.training.read_model_file
    pruned: list[Path] = []

    def read_after_a_prune(path: Path, **kwargs: object) -> object:
        if not pruned:  # the trainer saves step 96 and prunes the one we listed
            model = load_model_file(latest.model_path)
            model.num_timesteps = 96
            save_checkpoint(model, run / "checkpoints")
            for checkpoint in (older, latest):
                checkpoint.meta_path.unlink()
                checkpoint.model_path.unlink()
                pruned.append(checkpoint.model_path)
        return real(path, **kwargs)

    monkeypatch.setattr(agents.experiment.training, "read_model_file", read_after_a_prune)
    loaded = load_model(run, device="cpu")
    assert pruned and loaded.model_path.name == "step_000000000096.safetensors"


def test_a_full_disk_is_one_line_naming_the_path_and_leaves_no_orphans(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = load_model_file(run / "final_model.safetensors")
    real = agents.experiment.io._write_and_sync
    writes: list[int] = []

    def full_after(allowed: int):
        def write(f: object, data: bytes) -> None:
            writes.append(len(data))
            if len(writes) > allowed:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(f, data)

        return write

    target = tmp_path / "ckpt"
    monkeypatch.setattr(agents.experiment.io, "_write_and_sync", full_after(0))
    with pytest.raises(DiskFullError) as full:
        save_checkpoint(model, target)
    message = str(full.value)
    assert "\n" not in message and str(target / "step_000000000064.safetensors") in message
    assert "no space left" in message and " MB is needed" in message and " is free" in message
    assert not list(target.iterdir())  # no temp file

    writes.clear()
    monkeypatch.setattr(agents.experiment.io, "_write_and_sync", full_after(1))  # the JSON fails
    with pytest.raises(DiskFullError, match=r"step_000000000064\.json"):
        save_checkpoint(model, target)
    assert not list(target.iterdir())  # no model file without its sidecar

    script = importlib.util.spec_from_file_location("train_script", REPO / "scripts/train_agent.py")
    module = importlib.util.module_from_spec(script)
    script.loader.exec_module(module)
    monkeypatch.setattr(agents.experiment.io, "_write_and_sync", full_after(0))
    code = module.main([*TINY, f"train.runs_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err.strip()
    assert code == 4 and len(err.splitlines()) == 1, err
    assert err.startswith("error: no space left on the device to write ") and "config.yaml" in err


def test_every_resume_keeps_every_tensorboard_point(run: Path, tmp_path: Path) -> None:
    """Row 11: the train/* values of the update before a checkpoint are written at the next
    rollout's end; a resume lost them (one point per resume)."""
    resume(run, total_timesteps=128)
    straight = train(tiny_config(tmp_path, "train.total_timesteps=128"), tmp_path / "straight")
    for tag in ("train/loss", "train/value_loss", "rollout/ep_len_mean"):
        assert scalar_steps(run, tag) == scalar_steps(straight, tag), tag


# --------------------------------------------------------------------------------------
# Row 6: one writer per run directory
# --------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holder_pid(run: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from agents.experiment.training import run_lock\n"
            "with run_lock(Path(sys.argv[2])):\n"
            "    print('locked', flush=True); sys.stdin.read()",
            str(REPO),
            str(run),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"another process \(PID {holder.pid}\)"):
            resume(run, total_timesteps=96)
        assert not any(e["event"] == "resume" for e in history(run))
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    resume(run, total_timesteps=96)  # the lock went with its holder


# --------------------------------------------------------------------------------------
# Row 7: a signal stops an update within one minibatch
# --------------------------------------------------------------------------------------


def test_a_signal_stops_a_thalamus_update_within_one_minibatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agents.policy import ThalamusPolicy

    config = tiny_config(
        tmp_path,
        *THALAMUS,
        "ppo.batch_size=16",
        "ppo.n_epochs=4",  # 2 envs x 4 epochs: 8 minibatches an update
        "train.total_timesteps=128",
    )
    real = ThalamusPolicy.evaluate_actions
    calls_after_signal: list[int] = []
    weights: dict[str, th.Tensor] = {}

    def evaluate_actions(self: ThalamusPolicy, *args: object, **kwargs: object) -> object:
        if self._test_model.num_timesteps == 64 and not weights:  # the second update starts
            weights.update({k: v.clone() for k, v in self.state_dict().items()})
            signal.raise_signal(signal.SIGTERM)
        if weights:
            calls_after_signal.append(1)
        return real(self, *args, **kwargs)

    class Attach(BaseCallback):
        def _on_training_start(self) -> None:
            self.model.policy._test_model = self.model

        def _on_step(self) -> bool:
            return True

    attach = Attach()
    monkeypatch.setattr(ThalamusPolicy, "evaluate_actions", evaluate_actions)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(config, tmp_path / "run", extra_callbacks=lambda callbacks: [attach])
    assert len(calls_after_signal) == 1  # the minibatch it arrived in, and no other
    assert stopped.value.checkpoint.timesteps == 32  # that rollout's start: recollected
    for name, value in attach.model.policy.state_dict().items():
        assert th.equal(value, weights[name]), name  # the update was undone
    assert attach.model.num_timesteps == 32


def test_signals_during_a_save_reach_their_handler_when_it_is_done(tmp_path: Path) -> None:
    from agents.experiment.io import (
        atomic_write_bytes,
        signals_deferred,
    )

    seen: list[tuple[int, bool]] = []
    target = tmp_path / "file.bin"
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append((s, target.exists())))
    try:
        with signals_deferred():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # twice: delivered once
            atomic_write_bytes(target, b"data")  # nested: still held
            assert seen == []
        assert seen == [(signal.SIGTERM, True)]
    finally:
        signal.signal(signal.SIGTERM, previous)
