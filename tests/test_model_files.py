"""Model files: a round trip for every agent kind, and no loader runs code from a file."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path
from types import ModuleType

import cloudpickle
import pytest
import torch as th

import envs
from agents.experiment.config import DEFAULT_CONFIG, ConfigError, load_config, save_config
from agents.experiment.io import save_checkpoint
from agents.experiment.model_files import (
    ModelFileError,
    PickledModelError,
    load_model_file,
    read_model_file,
    save_model,
)
from agents.experiment.training import (
    build_agent,
    load_model,
    resume,
)
from tests.helpers import TINY_ROLLOUT, TINY_THALAMUS

REPO = Path(__file__).resolve().parents[1]
TINY = [
    *TINY_ROLLOUT,
    *TINY_THALAMUS,
    "lstm.lstm_hidden_size=16",
    "train.device=cpu",
    "train.eval_freq=0",
]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


THREE_STREAMS = (
    "thalamus.streams=[{name: visual}, {name: semantic, dt_min: 0.005, dt_max: 0.05, clock: 4},"
    " {name: episodic, kind: episodic, capacity: 8}]"
)


def _trained(kind: str, steps: int = 64, extra: tuple[str, ...] = ()) -> object:
    config = load_config(DEFAULT_CONFIG, [f"agent.kind={kind}", *TINY, *extra])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0, **config.env.env_kwargs)
    model = build_agent(config, venv)
    model.learn(steps)
    venv.close()
    return model


@pytest.mark.parametrize(
    "kind", ["thalamus", "ppo", "lstm", "thalamus-three-streams", "thalamus-separate-critic"]
)
def test_a_model_file_round_trips_weights_optimizer_and_counters(tmp_path: Path, kind: str) -> None:
    extra = {
        "thalamus-three-streams": (THREE_STREAMS,),
        "thalamus-separate-critic": ("policy.critic_trunk=separate",),
    }.get(kind, ())
    separate = kind == "thalamus-separate-critic"
    kind = kind.removesuffix("-three-streams").removesuffix("-separate-critic")
    model = _trained(kind, extra=extra)
    if kind == "thalamus":
        model.lr_factor = 0.25  # the KL adaptation's state travels too
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model_file(tmp_path / "m.safetensors", device="cpu")
    assert type(loaded) is type(model)
    for (name, a), (other, b) in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert name == other and th.equal(a, b), name
    saved, restored = model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict()
    assert saved["param_groups"] == restored["param_groups"]
    for index, state in saved["state"].items():
        for key, value in state.items():
            assert th.equal(value, restored["state"][index][key]), (index, key)
    for name in ("num_timesteps", "_n_updates", "_episode_num", "_current_progress_remaining"):
        assert getattr(loaded, name) == getattr(model, name), name
    assert list(loaded.ep_info_buffer) == list(model.ep_info_buffer)
    if kind == "thalamus":
        assert loaded.lr_factor == 0.25
    config = read_model_file(tmp_path / "m.safetensors").config
    assert config.agent.kind == kind
    if separate:  # the critic's own trunk: its weights and its Adam moments
        assert config.policy.critic_trunk == "separate"
        assert any(n.startswith("critic_extractor.") for n in loaded.policy.state_dict())
        assert len(saved["state"]) == len(list(model.policy.parameters()))
    elif extra:  # the clock and the episodic kind travel in the file's config
        assert [(s.kind, s.clock, s.capacity) for s in config.thalamus.streams] == [
            ("mamba", 1, 64),
            ("mamba", 4, 64),
            ("episodic", 1, 8),
        ]


# --------------------------------------------------------------------------------------
# A stable-baselines3 zip with a payload: refused everywhere without --trust-pickle
# --------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this writes a file: what an attacker's zip would do, harmlessly."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def _poison(zip_path: Path, marker: Path) -> None:
    """Put a ``__reduce__`` payload into the ``data`` JSON of an SB3 zip, as SB3 stores its
    cloudpickled entries (``:serialized:``)."""
    with zipfile.ZipFile(zip_path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    data = json.loads(entries["data"])
    blob = base64.b64encode(cloudpickle.dumps(_Payload(marker))).decode()
    data["action_noise"] = {":type:": "<class 'object'>", ":serialized:": blob}
    entries["data"] = json.dumps(data).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    zip_path.write_bytes(buffer.getvalue())


@pytest.fixture
def poisoned_run(tmp_path: Path) -> tuple[Path, Path]:
    """A run directory as older versions wrote it (SB3 zips), every zip carrying a payload."""
    config = load_config(
        DEFAULT_CONFIG, ["agent.kind=ppo", *TINY, "env.n_envs=1", "ppo.batch_size=16"]
    )
    venv = envs.make_vec_env(config.env.id, n_envs=1, seed=0, **config.env.env_kwargs)
    model = build_agent(config, venv)
    venv.close()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(config, run / "config.yaml")
    marker = tmp_path / "payload-ran"
    for path in (run / "final_model.zip", run / "checkpoints" / "step_000000000016.zip"):
        model.save(path)
        _poison(path, marker)
    rng = save_checkpoint(model, tmp_path / "scratch").load_meta()["rng"]
    sidecar = {"timesteps": 16, "model": "step_000000000016.zip", "rng": rng, "extra": {}}
    (run / "checkpoints" / "step_000000000016.json").write_text(json.dumps(sidecar))
    return run, marker


def test_no_loader_runs_a_payload_without_trust_pickle(
    poisoned_run: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    run, marker = poisoned_run
    zip_path = run / "final_model.zip"
    for target in (run, zip_path):
        with pytest.raises(PickledModelError, match=r"stable-baselines3 zip.*convert_run\.py"):
            load_model(target, device="cpu")
        assert _script("evaluate").main([str(target), "--episodes=1", "--device=cpu"]) == 2
        assert "--trust-pickle" in capsys.readouterr().err
        assert _script("diagnose_memory").main([str(target), "--episodes=1"]) == 2
        assert "--trust-pickle" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"older version.*convert_run\.py .*--trust-pickle"):
        resume(run, total_timesteps=64)
    with pytest.raises(ModelFileError, match="stable-baselines3 zip"):
        read_model_file(zip_path)
    assert _script("convert_run").main([str(run)]) == 2  # the converter asks for the opt-in
    assert not marker.exists(), "a loader ran the payload"

    # The payload is real: the explicit opt-in runs it (which is what its help says).
    load_model(zip_path, device="cpu", trust_pickle=True)
    assert marker.read_text() == "the payload ran"


def test_the_benchmark_refuses_an_old_run_without_deleting_it(
    poisoned_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from agents.bench import runner
    from agents.bench import suite as bench_suite
    from agents.experiment.config import ExperimentConfig

    run_dir, marker = poisoned_run

    class Run:
        key = "k"
        record_suite = "suite"
        budget = 64

        def load_config(self) -> ExperimentConfig:
            return load_config(run_dir / "config.yaml", defaults_file=None)

    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "suite").mkdir()
    run_dir.rename(runs / "suite" / "k")
    run_dir = runs / "suite" / "k"
    threshold = bench_suite.Threshold("mean_reward", 0.5)
    with pytest.raises(bench_suite.BenchmarkError, match=r"convert_run\.py"):
        runner.execute_run(Run(), tmp_path / "out", runs, threshold)  # type: ignore[arg-type]
    assert (run_dir / "checkpoints" / "step_000000000016.zip").is_file()
    assert not marker.exists()


def test_an_old_run_converts_with_the_opt_in_and_then_resumes(tmp_path: Path) -> None:
    config = load_config(DEFAULT_CONFIG, ["agent.kind=ppo", *TINY])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0, **config.env.env_kwargs)
    model = build_agent(config, venv)
    model.learn(32)
    venv.close()
    run = tmp_path / "run"
    save_config(config, run / "config.yaml")
    meta = save_checkpoint(model, run / "checkpoints").load_meta()
    (run / "checkpoints" / "step_000000000032.safetensors").unlink()
    model.save(run / "checkpoints" / "step_000000000032.zip")  # as an older version saved it
    meta["model"] = "step_000000000032.zip"
    (run / "checkpoints" / "step_000000000032.json").write_text(json.dumps(meta))

    assert _script("convert_run").main([str(run), "--trust-pickle"]) == 0
    converted = load_model_file(run / "checkpoints" / "step_000000000032.safetensors")
    for a, b in zip(model.policy.parameters(), converted.policy.parameters(), strict=True):
        assert th.equal(a.detach(), b.detach())
    assert converted.num_timesteps == 32
    resume(run, total_timesteps=64)
    assert load_model_file(run / "final_model.safetensors").num_timesteps == 64


def test_a_separate_critic_run_resumes_with_both_trunks(tmp_path: Path) -> None:
    """A run with its own critic trunk, stopped at its step-32 checkpoint, resumes to 64 steps
    from that checkpoint's two cores; policy.critic_trunk cannot change on resume."""
    from agents.experiment.training import train

    overrides = [
        *TINY,
        "policy.critic_trunk=separate",
        "train.checkpoint_freq=32",
        "train.total_timesteps=32",
        "train.progress=none",
        f"train.runs_dir={tmp_path}",
    ]
    run = train(load_config(DEFAULT_CONFIG, overrides))
    with pytest.raises(ConfigError, match="policy.critic_trunk"):
        resume(run, ["policy.critic_trunk=shared"], total_timesteps=64)
    resume(run, total_timesteps=64)
    final = load_model_file(run / "final_model.safetensors", device="cpu")
    assert final.num_timesteps == 64 and final.policy.critic_trunk == "separate"
    assert final.policy.critic_extractor is not None
