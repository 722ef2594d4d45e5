"""scripts/evaluate.py, evaluation rollouts, MP4 videos and the thalamus overlay."""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
from minigrid.core.constants import OBJECT_TO_IDX

import envs
from agents.experiment.config import DEFAULT_CONFIG, ExperimentConfig, load_config, save_config
from agents.experiment.model_files import save_model
from agents.experiment.training import build_agent
from agents.experiment.video import (
    GateView,
    SelectedCell,
    draw_selection,
    overlay_scale,
    panel_height,
    render_panel,
    run_episode,
    selected_cells,
    write_mp4,
)
from envs.geometry import view_to_world
from tests.helpers import save_untrained_run

REPO = Path(__file__).resolve().parents[1]
EVALUATE = REPO / "scripts" / "evaluate.py"
MAX_STEPS = 12
# A small thalamus agent on one env with short episodes (config overrides).
SMALL_AGENT = [
    "env.n_envs=1",
    "ppo.n_steps=16",
    "ppo.batch_size=16",
    f"env.env_kwargs.max_steps={MAX_STEPS}",
    "thalamus.d_model=32",
    "thalamus.d_task=32",
    "thalamus.d_workspace=32",
    "train.device=cpu",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory holding an (untrained) small thalamus agent and its config."""
    return save_untrained_run(tmp_path_factory.mktemp("run"), SMALL_AGENT)


def _config(run_dir: Path) -> ExperimentConfig:
    return load_config(run_dir / "config.yaml", defaults_file=None)


@pytest.mark.parametrize("env_id", ["MiniGrid-DoorKey-8x8-v0", "MiniGrid-MultiRoom-N2-S4-v0"])
def test_view_cells_map_to_the_grid_cells_minigrid_observes(env_id: str) -> None:
    env = envs.make_env(env_id, seed=0)
    rng = np.random.default_rng(0)
    obs, _ = env.reset(seed=0)
    u = env.unwrapped
    size = u.agent_view_size
    checked = 0
    for _ in range(40):
        _, visible = u.gen_obs_grid()
        for vis_i, vis_j in itertools.product(range(size), range(size)):
            x, y = view_to_world(u.agent_pos, u.agent_dir, size, vis_i, vis_j)
            assert u.get_view_coords(x, y) == (vis_i, vis_j)  # inverse of MiniGrid's own map
            inside = 0 <= x < u.width and 0 <= y < u.height
            if not inside or not visible[vis_i, vis_j] or (vis_i, vis_j) == (size // 2, size - 1):
                continue
            cell = u.grid.get(x, y)
            expected = cell.encode() if cell is not None else (OBJECT_TO_IDX["empty"], 0, 0)
            assert tuple(obs["image"][vis_i, vis_j]) == tuple(expected)
            checked += 1
        obs, *_ = env.step(int(rng.integers(0, 3)))  # turn left/right, forward
    assert checked > 100


def test_selected_tokens_land_on_their_view_cells(run_dir: Path) -> None:
    from agents.experiment.training import load_model

    policy = load_model(run_dir, device="cpu").model.policy
    layout = policy.tokenizer.token_layout
    env = envs.make_env("MiniGrid-DoorKey-8x8-v0", seed=1)
    env.reset(seed=1)
    u = env.unwrapped
    height, width = layout.grid_shape
    salience = np.zeros(layout.n_tokens)
    inside = 0
    for token in range(height * width):
        x, y = view_to_world(u.agent_pos, u.agent_dir, u.agent_view_size, *divmod(token, width))
        cells = selected_cells(GateView(salience, np.array([token]), np.ones(2)), layout, env)
        if 0 <= x < u.width and 0 <= y < u.height:
            assert cells == [SelectedCell(x, y, 1.0)], f"token {token}"
            inside += 1
        else:
            assert cells == []
    assert 0 < inside < height * width
    not_cells = np.array([layout.mission.start, layout.proprio])
    assert selected_cells(GateView(salience, not_cells, np.ones(2)), layout, env) == []


def test_draw_selection_changes_only_the_selected_tiles() -> None:
    frame = np.full((5 * 8, 6 * 8, 3), 100, dtype=np.uint8)
    cells = [SelectedCell(1, 2, 1.0), SelectedCell(4, 0, 0.1)]
    out = draw_selection(frame, cells, tile_size=8)
    changed = (out != frame).any(-1)
    expected = np.zeros(changed.shape, dtype=bool)
    expected[16:24, 8:16] = expected[0:8, 32:40] = True
    np.testing.assert_array_equal(changed, expected)
    # More salient cells are drawn more strongly.
    assert (
        np.abs(out[16:24, 8:16].astype(int) - 100).sum()
        > np.abs(out[0:8, 32:40].astype(int) - 100).sum()
    )


def test_overlay_frames_differ_from_plain_frames_exactly_at_the_selected_cells(
    run_dir: Path,
) -> None:
    from agents.experiment.training import load_model

    model = load_model(run_dir, device="cpu").model
    config = _config(run_dir)
    episodes = {}
    for mode in ("plain", "overlay"):
        env = envs.make_env(config.env.id, render_mode="rgb_array", **config.env.env_kwargs)
        episodes[mode] = run_episode(model, env, deterministic=True, frames=mode, seed=11)
        env.close()
    plain, overlay = episodes["plain"], episodes["overlay"]
    assert plain.length == overlay.length == MAX_STEPS  # an untrained agent times out
    assert len(plain.frames) == len(overlay.frames) == len(overlay.selections) == MAX_STEPS + 1

    # The overlay scales DoorKey-5x5's 160 px render 2x, so its text is legible as recorded.
    native_height, native_width, _ = plain.frames[0].shape
    scale = overlay_scale(native_width)
    assert (native_width, scale) == (160, 2)
    height, width = scale * native_height, scale * native_width
    tile = height // 5  # DoorKey-5x5
    assert {frame.shape for frame in overlay.frames} == {overlay.frames[0].shape}
    assert overlay.frames[0].shape[1:] == (width, 3)
    assert overlay.frames[0].shape[0] >= height + panel_height(2)
    assert sum(len(cells) for cells in overlay.selections) > 0
    for plain_frame, overlay_frame, cells in zip(
        plain.frames, overlay.frames, overlay.selections, strict=True
    ):
        plain_frame = np.repeat(np.repeat(plain_frame, scale, axis=0), scale, axis=1)
        changed = (overlay_frame[:height] != plain_frame).any(-1)
        expected = np.zeros((height, width), dtype=bool)
        for cell in cells:
            rows, cols = (
                slice(cell.y * tile, (cell.y + 1) * tile),
                slice(cell.x * tile, (cell.x + 1) * tile),
            )
            expected[rows, cols] = True
            assert changed[rows, cols].any(), f"selected cell {cell} is not drawn"
        assert not (changed & ~expected).any(), "pixels changed outside the selected cells"


def _decode(path: Path) -> tuple[int, tuple[int, int, int]]:
    reader = imageio.get_reader(path, "ffmpeg")
    try:
        frames = [frame for frame in reader]
    finally:
        reader.close()
    return len(frames), frames[0].shape


def test_write_mp4_keeps_frame_count_and_size(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (96, 64, 3), dtype=np.uint8) for _ in range(7)]
    assert _decode(write_mp4(tmp_path / "a.mp4", frames, fps=4)) == (7, (96, 64, 3))
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]


def test_a_video_that_fails_to_encode_leaves_no_file(tmp_path: Path) -> None:
    """An error mid-episode (here a frame of another size) must not leave a truncated
    ``episode_*.mp4`` that looks like a real recording, nor replace an older one."""
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (96, 64, 3), dtype=np.uint8) for _ in range(3)]
    write_mp4(tmp_path / "a.mp4", frames)
    before = (tmp_path / "a.mp4").read_bytes()
    with pytest.raises(Exception):  # noqa: B017, PT011  (imageio's error type is its own)
        write_mp4(tmp_path / "a.mp4", [*frames[::-1], *frames, np.zeros((32, 32, 3), np.uint8)])
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]
    assert (tmp_path / "a.mp4").read_bytes() == before


def _evaluate_main() -> Callable[[list[str]], int]:
    """``main`` of ``scripts/evaluate.py``, loaded as a module."""
    spec = importlib.util.spec_from_file_location("evaluate_script", EVALUATE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("overlay", [True, False], ids=["overlay", "no-overlay"])
def test_evaluate_script_writes_json_and_decodable_videos(
    run_dir: Path, tmp_path: Path, overlay: bool
) -> None:
    videos, output = tmp_path / "videos", tmp_path / "eval.json"
    args = [str(run_dir), "--episodes=3", "--seed=7", f"--video-dir={videos}", "--video-every=2"]
    args += [f"--output={output}", "--device=cpu"] + ([] if overlay else ["--no-overlay"])
    if overlay:  # as users run it, in a fresh interpreter
        result = subprocess.run(
            [sys.executable, str(EVALUATE), *args],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        for label in ("reward", "success", "length", "json"):
            assert label in result.stdout
    else:  # the same main() in this process, which saves an interpreter start-up
        assert _evaluate_main()(args) == 0

    summary = json.loads(output.read_text())
    assert summary["episodes"] == 3 and summary["env_id"] == "MiniGrid-DoorKey-5x5-v0"
    assert [e["seed"] for e in summary["per_episode"]] == [7, 8, 9]
    lengths = [e["length"] for e in summary["per_episode"]]
    assert summary["mean_length"] == pytest.approx(np.mean(lengths))
    assert summary["success_rate"] == pytest.approx(
        np.mean([e["success"] for e in summary["per_episode"]])
    )

    recorded = sorted(videos.glob("*.mp4"))
    assert [p.name for p in recorded] == ["episode_000.mp4", "episode_002.mp4"]
    env = envs.make_env(summary["env_id"], render_mode="rgb_array", max_steps=MAX_STEPS)
    env.reset(seed=0)
    height, width, _ = env.render().shape
    scale = overlay_scale(width) if overlay else 1
    for path, episode in zip(recorded, summary["per_episode"][::2], strict=True):
        assert episode["video"] == str(path)
        n_frames, (video_height, video_width, _) = _decode(path)
        assert (n_frames, video_width) == (episode["length"] + 1, scale * width)
        if overlay:  # the panel has at least one line of selected tokens
            assert video_height >= scale * height + panel_height(2)
        else:
            assert video_height == height


def test_recording_an_overlay_does_not_change_the_episodes(run_dir: Path) -> None:
    """The overlay's extra gate call on the final observation draws no action: the global
    RNG ends where an unrecorded episode leaves it, so later episodes play the same."""
    import torch as th

    from agents.experiment.training import load_model

    model = load_model(run_dir, device="cpu").model
    config = _config(run_dir)
    rng_after = {}
    for mode in ("none", "overlay"):
        env = envs.make_env(config.env.id, render_mode="rgb_array", **config.env.env_kwargs)
        th.manual_seed(0)
        run_episode(model, env, deterministic=False, frames=mode, seed=3)
        rng_after[mode] = th.get_rng_state()
        env.close()
    assert th.equal(rng_after["none"], rng_after["overlay"])


def test_evaluate_script_reports_env_kwargs_the_env_rejects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "run").mkdir()
    run = save_untrained_run(tmp_path / "run", [*SMALL_AGENT, "env.env_kwargs.size=5"])
    args = [str(run), "--episodes=1", "--device=cpu", "--env=BabyAI-GoToLocal-v0"]
    assert _evaluate_main()(args) == 2
    err = capsys.readouterr().err
    assert "cannot make BabyAI-GoToLocal-v0" in err and "'size': 5" in err


def test_evaluate_script_rejects_a_folder_without_a_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _evaluate_main()([str(tmp_path)]) == 2
    assert "holds no final_model.safetensors" in capsys.readouterr().err


def test_evaluate_script_shows_a_given_mission_and_rejects_unknown_words(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "eval.json"
    args = [str(run_dir), "--episodes=2", f"--output={output}", "--device=cpu"]
    shown = [*args, "--mission", "get to the green goal square", f"--video-dir={tmp_path}"]
    assert _evaluate_main()(shown) == 0  # the overlay's panel shows both missions
    assert json.loads(output.read_text())["mission"] == "get to the green goal square"
    assert len(list(tmp_path.glob("episode_*.mp4"))) == 2
    assert "shown in place of each episode's own" in capsys.readouterr().out
    assert _evaluate_main()([*args, "--mission", "fly to the moon"]) == 2
    assert "outside the vocabulary: ['fly', 'moon']" in capsys.readouterr().err


def test_evaluations_of_other_settings_do_not_replace_the_run_s_own(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    run = save_untrained_run(tmp_path / "run", SMALL_AGENT)
    main = _evaluate_main()
    base = [str(run), "--episodes=1", "--device=cpu"]
    assert main(base) == 0
    assert main([*base, "--mission", ""]) == 0  # no instruction at all
    assert main([*base, "--mission", "get to the green goal square", "--deterministic"]) == 0
    written = {p.name: json.loads(p.read_text()) for p in run.glob("evaluation*.json")}
    assert {name: summary["mission"] for name, summary in written.items()} == {
        "evaluation.json": None,
        "evaluation-mission-none.json": "",
        "evaluation-deterministic-mission-get-to-the-green-goal-square.json": (
            "get to the green goal square"
        ),
    }


def test_trial_episodes_are_split_into_attempts(tmp_path: Path) -> None:
    """On a 2-attempt trial env, run_episode and evaluate.py report each attempt."""
    config = load_config(
        DEFAULT_CONFIG,
        [*SMALL_AGENT, "env.id=MiniGrid-Empty-5x5-v0", "env.trial_episodes=2"],
    )
    venv = envs.make_vec_env(
        config.env.id, n_envs=1, seed=0, trial_episodes=2, **config.env.env_kwargs
    )
    model = build_agent(config, venv)
    venv.close()
    env = envs.make_env(config.env.id, trial_episodes=2, max_steps=MAX_STEPS)
    for seed in range(3):
        result = run_episode(model, env, deterministic=False, seed=seed)
        assert len(result.attempts) == 2  # an attempt cut at max_steps is still an attempt
        assert sum(a["length"] for a in result.attempts) == result.length
        assert sum(a["return"] for a in result.attempts) == pytest.approx(result.episode_return)
        assert result.attempts[-1]["success"] == result.success
    plain = run_episode(model, envs.make_env(config.env.id, max_steps=MAX_STEPS), seed=0)
    assert plain.attempts == []

    save_model(model, tmp_path / "final_model.safetensors")
    save_config(config, tmp_path / "config.yaml")
    output = tmp_path / "eval.json"
    assert _evaluate_main()([str(tmp_path), "--episodes=2", f"--output={output}"]) == 0
    summary = json.loads(output.read_text())
    assert [row["attempt"] for row in summary["attempts"]] == [1, 2]
    for row in summary["attempts"]:
        played = [e["attempts"][row["attempt"] - 1] for e in summary["per_episode"]]
        assert row["episodes"] == len(played) == 2
        assert row["mean_reward"] == pytest.approx(np.mean([a["return"] for a in played]))


def test_evaluate_runs_with_the_run_s_torch_threads_or_threads(tmp_path: Path) -> None:
    """It ran with torch's default of a thread per core whatever the run said (5 episodes:
    37-47 s on a busy 2-core machine against 6.5 s with one)."""
    import torch as th

    run = save_untrained_run(tmp_path, [*SMALL_AGENT, "train.torch_threads=1"])
    main, before = _evaluate_main(), th.get_num_threads()
    try:
        th.set_num_threads(2)
        assert main([str(run), "--episodes=1", f"--output={tmp_path / 'a.json'}"]) == 0
        assert th.get_num_threads() == 1
        assert json.loads((tmp_path / "a.json").read_text())["torch_threads"] == 1
        assert (
            main([str(run), "--episodes=1", "--threads=2", f"--output={tmp_path / 'b.json'}"]) == 0
        )
        assert th.get_num_threads() == 2
    finally:
        th.set_num_threads(before)
    assert main([str(run), "--threads=0"]) == 2


def test_ctrl_c_keeps_the_finished_episodes(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Ctrl-C during the third episode: one line, the two finished episodes printed and
    written beside the output (which a partial result must not replace), exit code 130."""
    import agents.experiment.video

    played = 0
    run_episode_before = agents.experiment.video.run_episode

    def interrupted_third(*args: object, **kwargs: object) -> object:
        nonlocal played
        played += 1
        if played == 3:
            raise KeyboardInterrupt
        return run_episode_before(*args, **kwargs)

    monkeypatch.setattr(agents.experiment.video, "run_episode", interrupted_third)
    output = tmp_path / "eval.json"
    code = _evaluate_main()([str(run_dir), "--episodes=5", "--seed=3", f"--output={output}"])
    captured = capsys.readouterr()
    assert code == 130
    assert captured.err.strip() == "interrupted (Ctrl-C) after 2 of 5 episodes; their results:"
    assert (
        "success  " in captured.out and f"json     {tmp_path / 'eval-partial.json'}" in captured.out
    )
    assert not output.exists()
    partial = json.loads((tmp_path / "eval-partial.json").read_text())
    assert partial["interrupted"] and partial["episodes_requested"] == 5
    assert [e["seed"] for e in partial["per_episode"]] == [3, 4]

    def interrupted_first(*args: object, **kwargs: object) -> object:
        raise KeyboardInterrupt

    monkeypatch.setattr(agents.experiment.video, "run_episode", interrupted_first)
    assert _evaluate_main()([str(run_dir), "--episodes=2", f"--output={output}"]) == 130
    assert capsys.readouterr().err.strip().endswith("after 0 of 2 episodes; nothing written")


def test_evaluating_on_another_env_warns_which_env_the_model_learned(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = [str(run_dir), "--episodes=1", f"--output={tmp_path / 'e.json'}"]
    assert _evaluate_main()([*args, "--env=MiniGrid-Empty-5x5-v0"]) == 0
    assert (
        "WARNING: the model was trained on MiniGrid-DoorKey-5x5-v0; evaluating it on "
        "MiniGrid-Empty-5x5-v0" in capsys.readouterr().err
    )
    assert _evaluate_main()(args) == 0
    assert "WARNING" not in capsys.readouterr().err


def test_the_selected_tokens_line_wraps_instead_of_being_cut() -> None:
    """The "words:" line was cut to one line with "...", hiding the rest of the kept tokens
    (``proprio`` last of all); it now wraps onto as many lines as it needs."""
    words = "words: " + ", ".join(["key", "door", "ball", "purple", "pick", "up"] * 3)
    extras = f"{words}; proprio"
    weights = np.array([0.7, 0.3])
    one_line = render_panel(320, "get the key", 3, 0.5, ["visual", "semantic"], weights, "proprio")
    wrapped = render_panel(320, "get the key", 3, 0.5, ["visual", "semantic"], weights, extras)
    assert one_line.shape == (panel_height(2), 320, 3)
    assert wrapped.shape[0] == panel_height(2, extra_lines=3)
    # Text in every wrapped line's band: the last one too, where "proprio" ends up.
    background = wrapped[-1, -1]
    text_rows = np.flatnonzero((wrapped != background).any(-1).any(-1))
    assert text_rows.max() > panel_height(2) - 8


def test_the_panel_draws_one_bar_per_stream_for_three_streams() -> None:
    """A 3-stream agent (visual, clocked semantic, episodic) gets three bars, each filled in
    proportion to its weight."""
    from agents.experiment.video import _LINE_HEIGHT, _MISSION_LINES, OVERLAY_COLOR

    names = ["visual", "semantic", "episodic"]
    weights = np.array([0.2, 0.3, 0.5])
    panel = render_panel(320, "go to the door", 1, 0.0, names, weights)
    assert panel.shape == (panel_height(3), 320, 3)
    filled = []
    for m in range(3):
        y = 4 + (_MISSION_LINES + 1 + m) * _LINE_HEIGHT + _LINE_HEIGHT // 2
        filled.append(int((panel[y] == np.asarray(OVERLAY_COLOR)).all(-1).sum()))
    assert 0 < filled[0] < filled[1] < filled[2]
    assert filled[2] / filled[0] == pytest.approx(2.5, rel=0.1)
