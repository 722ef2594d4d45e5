"""A run's files: atomic writes, RNG states, checkpoints, the run directory's writer lock.

Everything here writes so that a crash, a kill -9 or a full disk never leaves a torn file:

- :func:`atomic_write_bytes` / :func:`atomic_write_text` write a temp file beside the target,
  fsync it and rename it over the target; SIGINT/SIGTERM arriving during the write are held
  until it is done (:func:`signals_deferred`).
- A checkpoint is a model file (:mod:`agents.experiment.model_files`: weights, optimizer state,
  counters and the run's config, loaded without unpickling) and a JSON sidecar (timesteps, RNG
  states) written last: a checkpoint counts only once its JSON exists. A checkpoint that
  cannot be read is skipped with a warning by :func:`latest_good_checkpoint`.
- :func:`run_lock` allows one writer per run directory.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from agents.constants import MODEL_SUFFIX
from agents.experiment.config import ConfigError

if TYPE_CHECKING:
    from stable_baselines3.common.base_class import BaseAlgorithm

__all__ = [
    "RUN_LOCK_NAME",
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "CheckpointInfo",
    "DiskFullError",
    "RunLockedError",
    "atomic_save_model",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "checkpoint_problem",
    "disk_full_message",
    "global_rng_preserved",
    "is_disk_full",
    "latest_checkpoint",
    "latest_good_checkpoint",
    "list_checkpoints",
    "remove_stale_temp_files",
    "restore_rng_state",
    "run_lock",
    "save_checkpoint",
    "signals_deferred",
]

#: The writer lock's file name in a run directory (:func:`run_lock`).
RUN_LOCK_NAME = ".lock"

_log = logging.getLogger(__name__)


class DiskFullError(RuntimeError):
    """A save found the disk full; the message (one line) names the file and the space needed.
    Nothing already saved was touched."""


def disk_full_message(path: Path, needed: int | None) -> str:
    """One line naming ``path``, the space needed and the space free."""
    try:
        usage = os.statvfs(path.parent if path.parent.exists() else Path.cwd())
        free = usage.f_bavail * usage.f_frsize
    except OSError:
        free = None
    need = f" about {_megabytes(needed)} is needed" if needed is not None else ""
    has = f", {_megabytes(free)} is free" if free is not None else ""
    return (
        f"no space left on the device to write {path}:{need}{has}; free some space (or set "
        "train.runs_dir to another disk) and resume the run"
    )


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the quota) is full."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs (a save), then hand them to the handlers that
    were in place: the save finishes, and the signal still stops the run as it would have.

    Only the main thread can set handlers; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    # A handler installed outside Python reads as None and cannot be put back: leave it.
    previous = {
        signum: handler
        for signum in _STOP_SIGNALS
        if (handler := signal.getsignal(signum)) is not None
    }

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    for signum in previous:
        signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)


TEMP_PREFIX = "."
TEMP_SUFFIX = ".tmp"


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half:
    a temp file beside it, fsync, rename. Signals wait until it is done.

    :raises DiskFullError: no space left (one line with the path and the space needed); the
        temp file is removed and ``path`` is unchanged.
    """
    path = Path(path)
    with signals_deferred():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_SUFFIX
        )
        try:
            # mkstemp makes the file 0600 and os.replace keeps it: give it what open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as f:
                _write_and_sync(f, data)
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if is_disk_full(exc):
                raise DiskFullError(disk_full_message(path, len(data))) from None
            raise


def _write_and_sync(f: Any, data: bytes) -> None:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temp files that saves interrupted by a crash or kill -9 left in ``folder``
    (only ``.<name>.<random>.tmp`` files :func:`atomic_write_bytes` makes); return them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for candidate in folder.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
        if candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_model(model: BaseAlgorithm, path: str | os.PathLike[str]) -> None:
    """Save ``model`` as a ``.safetensors`` model file
    (:func:`agents.experiment.model_files.save_model`) into a temp file beside ``path``, then
    rename it over ``path``."""
    from agents.experiment.model_files import save_model  # it writes through this module

    save_model(model, path)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU and CUDA) as JSON-able data."""
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state()  # noqa: NPY002  (the global RNG SB3's set_random_seed seeds)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [legacy[0], legacy[1].tolist(), *[float(x) for x in legacy[2:]]],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [
            base64.b64encode(s.numpy().tobytes()).decode("ascii")
            for s in torch.cuda.get_rng_state_all()
        ]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    >>> s = capture_rng_state(); a = (random.random(), np.random.rand(), torch.rand(1).item())
    >>> restore_rng_state(s); a == (random.random(), np.random.rand(), torch.rand(1).item())
    True
    """
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    numpy_state = (name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), cached)
    np.random.set_state(numpy_state)  # noqa: NPY002

    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    cuda_states = state.get("torch_cuda")
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in cuda_states][: torch.cuda.device_count()])


@contextlib.contextmanager
def global_rng_preserved() -> Iterator[None]:
    """Run a block, an evaluation, without moving the global RNGs that training draws from.

    Stochastic evaluation samples its actions from torch's global RNG, as many draws as its
    episodes have steps. Without this, the evaluation settings changed training: every
    rollout after the first evaluation differed with ``train.eval_freq``,
    ``train.eval_episodes`` or the benchmark's second evaluation mode
    (``docs/measurements.md``, "evaluation RNG"). The block draws from a copy of the current
    states (python, numpy, torch CPU and CUDA).
    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint: the model file and its JSON sidecar.

    :ivar timesteps: env steps trained when it was saved.
    :ivar model_path: the ``.safetensors`` model file (weights, optimizer state, counters,
        config).
    :ivar meta_path: the JSON sidecar (timesteps, RNG states, ``extra``).
    """

    timesteps: int
    model_path: Path
    meta_path: Path

    def load_meta(self) -> dict[str, Any]:
        """The sidecar's contents."""
        return json.loads(self.meta_path.read_text())


def save_checkpoint(
    model: BaseAlgorithm,
    checkpoint_dir: str | os.PathLike[str],
    extra: dict[str, Any] | None = None,
) -> CheckpointInfo:
    """Save ``model`` as ``step_<timesteps>.safetensors`` + ``.json`` in ``checkpoint_dir``,
    atomically.

    The model file is renamed into place first and the JSON last, so a checkpoint whose JSON
    exists is complete; when the JSON cannot be written the model file is removed again.

    :param extra: more JSON-able state to keep beside the RNG states (e.g. the best eval reward).
    """
    checkpoint_dir = Path(checkpoint_dir)
    stem = f"step_{model.num_timesteps:012d}"
    info = CheckpointInfo(
        model.num_timesteps,
        checkpoint_dir / f"{stem}{MODEL_SUFFIX}",
        checkpoint_dir / f"{stem}.json",
    )
    atomic_save_model(model, info.model_path)
    meta = {
        "timesteps": model.num_timesteps,
        "model": info.model_path.name,
        "saved_at": _dt.datetime.now().isoformat(timespec="seconds"),
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    try:
        atomic_write_text(info.meta_path, json.dumps(meta))
    except BaseException:
        info.model_path.unlink(missing_ok=True)  # no model file without its sidecar
        raise
    return info


def list_checkpoints(checkpoint_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Complete checkpoints in ``checkpoint_dir``, oldest first (by timesteps)."""
    found = []
    for meta_path in Path(checkpoint_dir).glob("step_*.json"):
        model_path = meta_path.with_suffix(MODEL_SUFFIX)
        stem = meta_path.stem.removeprefix("step_")
        if model_path.is_file() and stem.isdigit():
            found.append(CheckpointInfo(int(stem), model_path, meta_path))
    return sorted(found, key=lambda c: c.timesteps)


def latest_checkpoint(checkpoint_dir: str | os.PathLike[str]) -> CheckpointInfo | None:
    """The complete checkpoint with the most timesteps, or None (not read: see
    :func:`latest_good_checkpoint`)."""
    checkpoints = list_checkpoints(checkpoint_dir)
    return checkpoints[-1] if checkpoints else None


def checkpoint_problem(checkpoint: CheckpointInfo) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (its sidecar or model file is unreadable or
    disagrees), or None when it reads."""
    try:
        meta = checkpoint.load_meta()
        if not isinstance(meta, dict) or "rng" not in meta:
            return f"its sidecar {checkpoint.meta_path.name} has no RNG states"
    except (OSError, ValueError) as exc:
        return f"its sidecar {checkpoint.meta_path.name} is unreadable ({exc})"
    from agents.experiment.model_files import ModelFileError, read_model_file

    try:
        model_file = read_model_file(checkpoint.model_path)
    except FileNotFoundError:
        return f"{checkpoint.model_path.name} is gone"
    except ModelFileError as exc:
        return str(exc)
    if model_file.timesteps != checkpoint.timesteps:
        return f"{checkpoint.model_path.name} holds step {model_file.timesteps}, not its name's"
    return None


def latest_good_checkpoint(
    checkpoint_dir: str | os.PathLike[str], warn: Callable[[str], None] | None = None
) -> CheckpointInfo | None:
    """The newest checkpoint that reads completely, or None.

    Newer checkpoints that do not read (a truncated or overwritten model file or sidecar) are
    skipped, each with a warning naming it, through ``warn`` (default: the ``logging`` warning
    of this module, and stderr).
    """
    warn = warn if warn is not None else _warn
    for checkpoint in reversed(list_checkpoints(checkpoint_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        warn(
            f"warning: skipping checkpoint {checkpoint.model_path} (step "
            f"{checkpoint.timesteps:,}): {problem}; using an older one"
        )
    return None


def _warn(message: str) -> None:
    _log.warning(message)
    print(message, file=sys.stderr, flush=True)


class RunLockedError(ConfigError):
    """Another process is writing the run directory."""


@contextlib.contextmanager
def run_lock(root: Path) -> Iterator[None]:
    """Hold the run directory's writer lock (``fcntl.flock`` on ``root/.lock``, which holds the
    writer's PID) for the block: one training process per run directory. The lock goes with
    the process, so a killed writer never leaves a stale one.

    :raises RunLockedError: another process holds it (its PID named).
    :raises ConfigError: ``root`` is not a directory.
    """
    if not root.is_dir():
        raise ConfigError(f"{root} is not a run directory")
    path = root / RUN_LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunLockedError(
            f"{root} is being written by another process (PID {holder}): two writers would "
            f"overwrite each other's checkpoints; wait for it to finish, or stop it (kill "
            f"{holder}: it saves a checkpoint) and resume again"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
