"""The README as a newcomer follows it: the files, flags and names it gives exist.

The static checks read every script, config and link the README names, and parse each
``train_agent.py`` / ``evaluate.py`` command of its code blocks with the script's own argument
parser. The run check trains the quick start's command at a tiny budget and holds the README's
run-directory listing, its example file names and the commands the run prints to what the run
writes; the evaluate command is pasted as printed.
"""

from __future__ import annotations

import importlib.util
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from agents.experiment.config import DEFAULT_CONFIG, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _code_blocks(text: str) -> list[str]:
    """The contents of the fenced blocks that are shell commands or plain text."""
    blocks, current, language = [], None, ""
    for line in text.splitlines():
        if line.startswith("```"):
            if current is None:
                current, language = [], line[3:].strip()
            else:
                if language in ("", "bash"):
                    blocks.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return blocks


CODE_BLOCKS = _code_blocks(README)
# The quick start's run at a tiny budget: 2 envs, 10-step episodes, a small core.
TINY = [
    "--n-envs=2",
    "--device=cpu",
    "--total-timesteps=64",
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
    "train.eval_freq=32",
    "train.checkpoint_freq=32",
    "train.video=true",
    "train.progress=log",
    "train.torch_threads=1",
]


def _script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"readme_{name}", REPO / "scripts" / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(script: str) -> list[list[str]]:
    """The arguments of every ``.venv/bin/python scripts/<script>`` line of the code blocks."""
    found = []
    for block in CODE_BLOCKS:
        for line in block.splitlines():
            line = line.split("#")[0].replace("&&", "\n").strip()
            for part in line.splitlines():
                if not part.strip().startswith(".venv/bin/python"):
                    continue
                words = shlex.split(part)
                if words[:2] == [".venv/bin/python", f"scripts/{script}"]:
                    found.append(words[2:])
    return found


def test_every_script_config_and_link_the_readme_names_exists() -> None:
    scripts = set(re.findall(r"scripts/[\w.]+\.(?:py|sh)", README))
    configs = {c for c in re.findall(r"configs/[\w/.*]+\.yaml", README) if "*" not in c}
    links = set(re.findall(r"\]\(((?!https?:)[^)#]+)\)", README))
    assert scripts and configs and links
    missing = [name for name in sorted(scripts | configs | links) if not (REPO / name).exists()]
    assert missing == []


def test_every_train_and_evaluate_command_in_the_readme_parses() -> None:
    """Each command's flags exist; a fresh-run command's config (file, flags and overrides)
    loads; placeholders like ``runs/<run>`` stand for any path."""
    train, evaluate = _script("train_agent.py"), _script("evaluate.py")
    train_commands, evaluate_commands = _commands("train_agent.py"), _commands("evaluate.py")
    assert len(train_commands) >= 8 and len(evaluate_commands) >= 3
    for words in train_commands:
        if "--help" in words:  # prints and exits; tests/test_train_script.py runs it
            continue
        args = train.build_parser().parse_intermixed_args(words)
        if args.resume is None and not args.help_config:
            try:
                load_config(train._config_file(args), train._overrides(args))
            except ConfigError as exc:
                pytest.fail(f"README command {' '.join(words)!r}: {exc}")
    for words in evaluate_commands:
        evaluate.build_parser().parse_args(words)


def _listing() -> list[str]:
    """The top-level names of the README's "What a run directory holds" block."""
    block = next(b for b in CODE_BLOCKS if b.startswith("config.yaml"))
    return [line.split()[0] for line in block.splitlines() if line and not line[0].isspace()]


def test_the_readme_s_example_file_names_are_what_the_default_run_writes() -> None:
    """``step_000000050000.safetensors`` was never written: a checkpoint is taken at the first
    update after each ``train.checkpoint_freq`` steps, and updates come every n_envs x n_steps."""
    config = load_config(DEFAULT_CONFIG)
    rollout = config.env.n_envs * config.ppo.n_steps
    checkpoint = math.ceil(config.train.checkpoint_freq / rollout) * rollout
    evaluation = math.ceil(config.train.eval_freq / config.env.n_envs) * config.env.n_envs
    assert f"step_{checkpoint:012d}.safetensors" in README
    assert f"eval_{evaluation:012d}.mp4" in README
    assert "episode_000.mp4" in README
    for stale in ("episode_<i>.mp4", "step_000000050000", "eval_000000050000"):
        assert stale not in README


def test_the_quick_start_run_writes_and_prints_what_the_readme_says(tmp_path: Path) -> None:
    quick_start = next(words for words in _commands("train_agent.py") if not words)
    result = subprocess.run(
        [sys.executable, "scripts/train_agent.py", *quick_start, *TINY,
         f"train.runs_dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first.startswith("run directory: ") and "`run directory: runs/" in README
    run_dir = Path(first.removeprefix("run directory: "))
    assert run_dir.parent == tmp_path
    assert re.fullmatch(r"MiniGrid-DoorKey-5x5-v0__thalamus__0__\d{8}-\d{6}", run_dir.name)
    assert "runs/<env>__<agent>__<seed>__<YYYYmmdd-HHMMSS>/" in README

    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step_{s:012d}.{x}" for s in (32, 64) for x in ("json", "safetensors")]
    assert sorted(p.name for p in (run_dir / "videos").iterdir()) == [
        f"eval_{s:012d}.mp4" for s in (32, 64)
    ]

    # The closing summary's evaluate command, pasted as printed (one episode).
    evaluate_line = next(x for x in result.stdout.splitlines() if x.startswith("  evaluate  "))
    command = shlex.split(evaluate_line.removeprefix("  evaluate  "))
    assert Path(command[0]).name.startswith("python") and command[1].endswith("evaluate.py")
    pasted = subprocess.run(
        [*command, "--episodes=1", "--device=cpu", "--threads=1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert pasted.returncode == 0, pasted.stderr
    assert (run_dir / "videos" / "episode_000.mp4").is_file()

    for name in _listing():  # config.yaml, tb/, checkpoints/, ..., evaluation.json
        path = run_dir / name.rstrip("/")
        assert path.is_dir() if name.endswith("/") else path.is_file(), name

    # The watch command is the venv's tensorboard the README names.
    watch = next(x for x in result.stdout.splitlines() if x.startswith("  watch     "))
    program = Path(shlex.split(watch.removeprefix("  watch     "))[0])
    assert program.name == "tensorboard" and ".venv/bin/tensorboard --logdir runs" in README
    assert (REPO / program).parent == (REPO / Path(command[0])).parent
