"""Evaluation rollouts rendered to frames, the thalamus overlay, and MP4 writing.

The overlay makes the agent's attention visible. On MiniGrid's full-grid render
(``render_mode="rgb_array"``) each frame marks the grid cells whose tokens the gate selected
at that step, tinted and outlined with an intensity given by their salience, and a panel
under the grid shows the mission, the step, the reward so far, the streams' competition
weights and which non-cell tokens (mission words, the proprio token) were selected.

Cells are placed with MiniGrid's own view geometry (:mod:`envs.geometry`): token
``j < H*W`` of the tokenizer is cell ``(j // W, j % W)`` of the egocentric ``image``, mapped
to the grid with :func:`envs.geometry.view_cell_in_grid`.

Videos are written with imageio + imageio-ffmpeg, which ships its own ffmpeg binary, so
recording works headless on a fresh machine.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from stable_baselines3.common.base_class import BaseAlgorithm

from agents.experiment.rollout import Episode, play_episode
from agents.registry import spec_of_model
from agents.stepping import AgentStep
from agents.tokenizer import TokenLayout
from envs.geometry import view_cell_in_grid

__all__ = [
    "OVERLAY_COLOR",
    "OVERLAY_MIN_WIDTH",
    "EpisodeRecording",
    "GateView",
    "SelectedCell",
    "compose_frame",
    "draw_selection",
    "encode_gif",
    "overlay_scale",
    "panel_height",
    "render_panel",
    "run_episode",
    "selected_cells",
    "write_mp4",
]

OVERLAY_COLOR: tuple[int, int, int] = (0, 230, 255)
"""Colour of selected cells (cyan: not used by any MiniGrid object)."""
_PANEL_BG = (24, 24, 24)
_PANEL_TEXT = (235, 235, 235)
_PANEL_DIM = (150, 150, 150)
_FONT_SIZE = 15
_LINE_HEIGHT = 19
_MISSION_LINES = 2
OVERLAY_MIN_WIDTH = 320
"""Overlay frames narrower than this are scaled up by a whole factor (nearest neighbour):
MiniGrid's 5x5 render is 160 px wide, where 11 px text was ~8 px tall and a line held ~25
characters; at 320 px the 15 px text is legible at the video's native size."""

FrameMode = Literal["none", "plain", "overlay"]


@dataclass(frozen=True)
class GateView:
    """One env's thalamus step, as the overlay needs it (numpy, no batch dim).

    :ivar salience: ``[N]`` gate logits (``-inf`` at masked tokens).
    :ivar indices: ``[K]`` selected token ids.
    :ivar stream_weights: ``[M]`` competition weights of the streams.
    """

    salience: np.ndarray
    indices: np.ndarray
    stream_weights: np.ndarray

    @classmethod
    def from_output(cls, output: Any, env_index: int = 0) -> GateView:
        """Take env ``env_index`` of a step's ``ThalamusOutput`` (leading dim ``[B]``)."""
        return cls(
            salience=output.salience[env_index].detach().float().cpu().numpy(),
            indices=output.indices[env_index].detach().cpu().numpy().astype(np.int64),
            stream_weights=output.stream_weights[env_index].detach().float().cpu().numpy(),
        )

    def intensities(self) -> np.ndarray:
        """``[K]`` in ``(0, 1]``: ``exp(s_j - max_k s_k)`` over the selected tokens.

        The most salient selected token is 1; a token half as likely under a softmax of
        the salience is 0.5. Selected tokens with ``-inf`` salience (empty slots) get 0.
        """
        selected = self.salience[self.indices].astype(np.float64)
        finite = np.isfinite(selected)
        if not finite.any():
            return np.zeros(len(selected))
        top = selected[finite].max()
        return np.where(finite, np.exp(np.where(finite, selected - top, 0.0)), 0.0)


@dataclass(frozen=True)
class SelectedCell:
    """A grid cell whose token the gate selected: ``(x, y)`` and intensity in ``[0, 1]``."""

    x: int
    y: int
    intensity: float


def selected_cells(gate: GateView, layout: TokenLayout, env: gym.Env) -> list[SelectedCell]:
    """The grid cells of the selected image tokens that lie inside the grid.

    :param gate: the step's selection.
    :param layout: the tokenizer's token layout (image tokens first, row-major).
    :param env: the MiniGrid env (any wrapper), in the state the selection was made on.
    """
    height, width = layout.grid_shape
    view_size = int(env.unwrapped.agent_view_size)
    if (height, width) != (view_size, view_size):
        raise ValueError(
            f"the tokenizer's image grid is {height}x{width} but the env's agent_view_size is "
            f"{view_size}: the overlay needs the policy's env"
        )
    cells = []
    for token, intensity in zip(gate.indices, gate.intensities(), strict=True):
        if not layout.image.start <= token < layout.image.stop or intensity <= 0.0:
            continue
        vis_i, vis_j = divmod(int(token) - layout.image.start, width)
        cell = view_cell_in_grid(env, vis_i, vis_j)
        if cell is not None:
            cells.append(SelectedCell(*cell, float(intensity)))
    return cells


def _selected_extras(gate: GateView, layout: TokenLayout, mission_ids: np.ndarray | None) -> str:
    """``'words: key, door; proprio'`` for the selected tokens that are not cells."""
    from envs import default_vocabulary

    words, proprio = [], False
    for token in gate.indices:
        token = int(token)
        if layout.mission.start <= token < layout.mission.stop and mission_ids is not None:
            word_id = int(mission_ids[token - layout.mission.start])
            if word_id != 0:
                words.append(default_vocabulary().decode([word_id]))
        elif token == layout.proprio:
            proprio = True
    parts = []
    if words:
        parts.append("words: " + ", ".join(words))
    if proprio:
        parts.append("proprio")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------


def draw_selection(
    frame: np.ndarray,
    cells: Sequence[SelectedCell],
    tile_size: int,
    color: tuple[int, int, int] = OVERLAY_COLOR,
) -> np.ndarray:
    """Tint and outline the selected cells of a full-grid render; pixels elsewhere unchanged.

    Each cell's tile is blended towards ``color`` with opacity ``0.15 + 0.45 * intensity``
    and gets a 2-pixel outline of ``color`` at ``0.4 + 0.6 * intensity``.

    :param frame: ``[H*tile, W*tile, 3]`` uint8 render (not modified).
    :param cells: the cells to mark.
    :param tile_size: pixels per cell.
    :return: a new ``[H*tile, W*tile, 3]`` uint8 frame.
    """
    out = frame.astype(np.float32)
    rgb = np.asarray(color, dtype=np.float32)
    edge = max(1, tile_size // 16)
    for cell in cells:
        y0, x0 = cell.y * tile_size, cell.x * tile_size
        tile = out[y0 : y0 + tile_size, x0 : x0 + tile_size]
        fill = 0.15 + 0.45 * cell.intensity
        tile[:] = (1 - fill) * tile + fill * rgb
        border = np.zeros(tile.shape[:2], dtype=bool)
        border[:edge, :] = border[-edge:, :] = border[:, :edge] = border[:, -edge:] = True
        line = 0.4 + 0.6 * cell.intensity
        tile[border] = (1 - line) * tile[border] + line * rgb
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@cache
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled font (FreeType when available, else its bitmap font): no system fonts."""
    return ImageFont.load_default(size=_FONT_SIZE)


def _wrap(text: str, width: int, max_lines: int) -> list[str]:
    font, lines, line = _font(), [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        while lines[-1] and font.getlength(lines[-1] + "...") > width:
            lines[-1] = lines[-1][:-1]
        lines[-1] += "..."
    return lines


def overlay_scale(width: int) -> int:
    """The whole factor an overlay scales a ``width``-pixel render by: the smallest that makes
    it at least :data:`OVERLAY_MIN_WIDTH` wide (1 for wide renders).

    >>> overlay_scale(160), overlay_scale(256), overlay_scale(352)
    (2, 2, 1)
    """
    return max(1, math.ceil(OVERLAY_MIN_WIDTH / max(width, 1)))


def panel_height(n_streams: int, extra_lines: int = 1) -> int:
    """Height in pixels of the panel for ``n_streams`` streams and ``extra_lines`` lines of
    selected non-cell tokens (a multiple of 16).

    >>> panel_height(2), panel_height(2, extra_lines=2)
    (128, 144)
    """
    lines = _MISSION_LINES + 1 + n_streams + extra_lines
    return 16 * math.ceil((lines * _LINE_HEIGHT + 8) / 16)


def _extras_lines(extras: str, width: int) -> list[str]:
    """``extras`` wrapped to ``width`` pixels, every word kept (no line limit)."""
    return _wrap(extras, width - 8, max_lines=10_000) if extras else []


def render_panel(
    width: int,
    mission: str,
    step: int,
    episode_return: float,
    stream_names: Sequence[str] = (),
    stream_weights: np.ndarray | None = None,
    extras: str = "",
) -> np.ndarray:
    """The text panel shown under the grid: ``[panel_height(M, L), width, 3]`` for ``M``
    streams and the ``L >= 1`` lines ``extras`` wraps to.

    :param mission: the mission string (wrapped to two lines).
    :param step: steps taken so far in the episode.
    :param episode_return: reward collected so far.
    :param stream_names: the streams' names (one bar each).
    :param stream_weights: ``[M]`` their competition weights (``None``: not a thalamus agent).
    :param extras: the last lines, e.g. the selected mission words, wrapped, never cut.
    """
    extra_lines = _extras_lines(extras, width)
    height = panel_height(len(stream_names), max(len(extra_lines), 1))
    image = Image.new("RGB", (width, height), _PANEL_BG)
    draw = ImageDraw.Draw(image)
    font = _font()
    y = 4
    for line in _wrap(mission, width - 8, _MISSION_LINES):
        draw.text((4, y), line, fill=_PANEL_TEXT, font=font)
        y += _LINE_HEIGHT
    y = 4 + _MISSION_LINES * _LINE_HEIGHT
    draw.text((4, y), f"step {step}   reward {episode_return:.2f}", fill=_PANEL_TEXT, font=font)
    y += _LINE_HEIGHT
    label_width = max([font.getlength(n) for n in stream_names], default=0) + 8
    bar_x0, bar_x1 = 4 + label_width, width - 36
    for m, name in enumerate(stream_names):
        draw.text((4, y), name, fill=_PANEL_DIM, font=font)
        if stream_weights is not None and bar_x1 > bar_x0:
            weight = float(stream_weights[m])
            draw.rectangle((bar_x0, y + 3, bar_x1, y + _LINE_HEIGHT - 3), outline=_PANEL_DIM)
            filled = bar_x0 + (bar_x1 - bar_x0) * min(max(weight, 0.0), 1.0)
            draw.rectangle((bar_x0, y + 3, filled, y + _LINE_HEIGHT - 3), fill=OVERLAY_COLOR)
            draw.text((bar_x1 + 4, y), f"{weight:.2f}", fill=_PANEL_TEXT, font=font)
        y += _LINE_HEIGHT
    for line in extra_lines:
        draw.text((4, y), line, fill=_PANEL_DIM, font=font)
        y += _LINE_HEIGHT
    return np.asarray(image, dtype=np.uint8)


def compose_frame(
    frame: np.ndarray,
    env: gym.Env,
    step: int,
    episode_return: float,
    cells: Sequence[SelectedCell] = (),
    stream_names: Sequence[str] = (),
    stream_weights: np.ndarray | None = None,
    extras: str = "",
) -> np.ndarray:
    """One overlay frame: the render scaled by ``s = overlay_scale(Wp)`` with ``cells``
    marked, over the text panel.

    :param frame: ``[Hp, Wp, 3]`` the env's full-grid render of the current state.
    :param env: the env, in the rendered state (for the grid size and the mission).
    :param cells: the selected cells (:func:`selected_cells`).
    :return: ``[s * Hp + panel_height(M, L), s * Wp, 3]`` uint8, ``L`` the lines ``extras``
        wraps to (:func:`run_episode` pads an episode's frames to one size).
    """
    unwrapped = env.unwrapped
    scale = overlay_scale(frame.shape[1])
    if scale > 1:
        frame = np.repeat(np.repeat(frame, scale, axis=0), scale, axis=1)
    if cells:
        frame = draw_selection(frame, cells, tile_size=frame.shape[0] // unwrapped.height)
    try:  # a mission shown in place of the env's (scripts/evaluate.py --mission)
        shown = env.get_wrapper_attr("mission_override")
    except AttributeError:
        shown = None
    if shown is None:
        mission = str(unwrapped.mission)
    else:
        mission = f"{shown or '(no mission)'} (env: {unwrapped.mission})"
    panel = render_panel(
        frame.shape[1],
        mission,
        step,
        episode_return,
        stream_names,
        stream_weights,
        extras,
    )
    return np.concatenate([frame, panel], axis=0)


# --------------------------------------------------------------------------------------
# Rollouts
# --------------------------------------------------------------------------------------


@dataclass
class EpisodeRecording:
    """One evaluation episode.

    :ivar episode_return: summed reward.
    :ivar length: steps taken.
    :ivar success: ``info["is_success"]`` at the end (False when the env does not say).
    :ivar attempts: on a trial env (``trial_episodes`` >= 2, :class:`envs.TrialWrapper`),
        each attempt played, in order, as ``{"return", "length", "success"}``; empty for a
        plain episode.
    :ivar frames: ``length + 1`` frames ``[H, W, 3]`` uint8 (reset, then after each step),
        empty when not recording; overlay frames are padded at the bottom to the tallest
        panel of the episode.
    :ivar selections: with the overlay, the cells marked on each frame.
    """

    episode_return: float
    length: int
    success: bool
    attempts: list[dict[str, Any]] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)
    selections: list[list[SelectedCell]] = field(default_factory=list)


def run_episode(
    model: BaseAlgorithm,
    env: gym.Env,
    *,
    deterministic: bool = True,
    frames: FrameMode = "none",
    seed: int | None = None,
    max_steps: int | None = None,
) -> EpisodeRecording:
    """Play one episode of ``model`` on a single (unvectorised) env, optionally rendering.

    The episode is :func:`agents.experiment.rollout.play_episode`'s; for an agent whose kind
    shows a gate (:attr:`agents.registry.AgentSpec.shows_gate`) each overlay frame shows that
    step's selection and stream weights.

    :param model: a trained agent of any registered kind.
    :param env: an env from ``envs.make_env`` (``render_mode="rgb_array"`` to record).
    :param deterministic: take the most likely action.
    :param frames: ``"none"``, ``"plain"`` (the env's render) or ``"overlay"``.
    :param seed: seed of the reset (``None``: continue the env's RNG).
    :param max_steps: stop after this many steps even if the episode has not ended.
    :return: the episode's return, length, success and frames.
    """
    if frames != "none" and env.render_mode != "rgb_array":
        raise ValueError(
            f"recording frames needs an env made with render_mode='rgb_array', got "
            f"{env.render_mode!r}"
        )
    agent_spec = spec_of_model(model)
    stepper = agent_spec.make_stepper(model)
    shows_gate = agent_spec.shows_gate
    layout = model.policy.tokenizer.token_layout if shows_gate else None
    stream_names = (
        [s.name for s in model.policy.features_extractor.config.streams] if shows_gate else []
    )
    recording = EpisodeRecording(0.0, 0, False)

    def record(episode: Episode, obs: dict[str, np.ndarray], step: AgentStep | None) -> None:
        if frames == "none":
            return
        frame = np.asarray(env.render())
        if frames == "overlay":
            gate = (
                GateView.from_output(step.thalamus)
                if step is not None and step.thalamus is not None
                else None
            )
            cells, extras, weights = [], "", None
            if gate is not None and layout is not None:
                cells = selected_cells(gate, layout, env)
                mission_ids = obs.get(layout.mission_key) if layout.mission_key else None
                extras = _selected_extras(gate, layout, mission_ids)
                weights = gate.stream_weights
            frame = compose_frame(
                frame,
                env,
                episode.length,
                episode.episode_return,
                cells,
                stream_names,
                weights,
                extras,
            )
            recording.selections.append(cells)
        recording.frames.append(frame)

    episode = play_episode(
        model,
        env,
        deterministic=deterministic,
        seed=seed,
        max_steps=max_steps,
        on_step=record,
        stepper=stepper,
    )
    final_step = None
    if frames == "overlay" and shows_gate:
        # The gate's selection on the final observation; greedy, so that no action is drawn
        # from the global RNG (a recorded run must play the same episodes as an unrecorded one).
        final_step = stepper.act(episode.final_obs, False, True, advance=False)
    record(episode, episode.final_obs, final_step)
    if frames == "overlay":  # the wrapped token lines vary by step; a video needs one size
        tallest = max(f.shape[0] for f in recording.frames)
        recording.frames = [_pad_bottom(f, tallest) for f in recording.frames]
    recording.episode_return = episode.episode_return
    recording.length = episode.length
    recording.success = episode.success
    recording.attempts = episode.attempts
    return recording


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------


def _pad_bottom(frame: np.ndarray, height: int) -> np.ndarray:
    """``frame`` with panel-coloured rows added below it up to ``height``."""
    if frame.shape[0] >= height:
        return frame
    pad = np.empty((height - frame.shape[0], *frame.shape[1:]), dtype=frame.dtype)
    pad[:] = _PANEL_BG
    return np.concatenate([frame, pad], axis=0)


def _pad_even(frame: np.ndarray) -> np.ndarray:
    """Pad with black to even height and width (H.264 with yuv420p needs even sizes)."""
    pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
    if pad_h or pad_w:
        frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)))
    return frame


def write_mp4(path: str | os.PathLike[str], frames: Sequence[np.ndarray], fps: int = 4) -> Path:
    """Encode ``frames`` (``[H, W, 3]`` uint8, all the same size) as an H.264 MP4.

    Odd sizes are padded by one black row/column; no resizing happens.

    :return: the written path.
    """
    import imageio.v2 as imageio

    if not frames:
        raise ValueError("write_mp4 needs at least one frame")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Encoded beside the target, then renamed over it: an encoder error or a Ctrl-C leaves no
    # truncated video under the real name. The temp name keeps the suffix ffmpeg reads.
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    writer = imageio.get_writer(
        partial,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        for frame in frames:
            writer.append_data(_pad_even(np.asarray(frame, dtype=np.uint8)))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        partial.unlink(missing_ok=True)
        raise
    return path


def encode_gif(frames: Sequence[np.ndarray], fps: int = 4) -> bytes:
    """Encode ``frames`` as an animated GIF (for tensorboard's image tab)."""
    images = [Image.fromarray(np.asarray(f, dtype=np.uint8)) for f in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=max(1, round(1000 / fps)),
        loop=0,
    )
    return buffer.getvalue()
