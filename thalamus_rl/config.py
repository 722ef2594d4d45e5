"""The core's sizes and switches as plain dataclasses: no torch, so configs load fast.

:class:`ThalamusConfig` and :class:`StreamConfig` are what a config file's ``thalamus`` section
is checked against (``agents/experiment/config.py``); ``scripts/train_agent.py --help-config`` and
``--print-config`` read them without importing torch. The modules re-export them
(``thalamus_rl.core.ThalamusConfig``, ``thalamus_rl.distributed.StreamConfig``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "BACKENDS",
    "STREAM_KINDS",
    "StreamConfig",
    "ThalamusConfig",
    "check_stream_config",
    "default_streams",
]

BACKENDS = ("auto", "pure", "kernel")
"""``ThalamusConfig.backend`` choices (see :func:`thalamus_rl.mamba2.use_kernel_path`)."""

STREAM_KINDS = ("mamba", "episodic")
"""``StreamConfig.kind`` choices (see :mod:`thalamus_rl.distributed`)."""


@dataclass
class StreamConfig:
    """One named stream: a stack of Mamba-2 blocks with its own time scale.

    The state half-life of a head is ``ln 2 / (dt * A)`` steps, so ``dt_min/dt_max`` and
    ``A_init_min/A_init_max`` set the range of time scales at initialisation.

    :param name: the stream's name (logged as ``thalamus/stream_weight/<name>``).
    :param n_layers: Mamba-2 blocks in the stream's residual stack.
    :param d_state: SSM state size per head (N).
    :param expand: inner width / d_model.
    :param headdim: channels per SSM head.
    :param d_conv: causal convolution width.
    :param dt_min: smallest initial step size dt.
    :param dt_max: largest initial step size dt.
    :param A_init_min: smallest initial decay rate A.
    :param A_init_max: largest initial decay rate A.
    :param clock: the stream takes an input and updates its state only on the steps whose
        phase (steps since the episode start) is a multiple of ``clock``, and holds its state
        and its output in between (1 = every step). Training runs the stream's scan on the
        clocked steps only (about ``1 / clock`` of its compute); rollouts still compute it for
        every env each step and keep the result where the clock ticks. ``mamba`` streams only.
    :param kind: ``mamba`` (a Mamba-2 stack) or ``episodic`` (a bounded per-episode store of
        one key/value per step, read by attention with a learned, input-conditioned query,
        see :class:`~thalamus_rl.distributed.EpisodicStream`; it uses ``name``, ``capacity``
        and ``headdim`` as its attention head width, and ignores the Mamba-2 sizes).
    :param capacity: ``episodic`` streams: the store keeps the last ``capacity`` steps of the
        episode (FIFO: the oldest entry is overwritten when it is full).
    """

    name: str = "visual"
    n_layers: int = 1
    d_state: int = 16
    expand: int = 2
    headdim: int = 32
    d_conv: int = 4
    dt_min: float = 0.1
    dt_max: float = 0.5
    A_init_min: float = 1.0
    A_init_max: float = 2.0
    clock: int = 1
    kind: str = "mamba"
    capacity: int = 64


def check_stream_config(stream: StreamConfig, where: str = "StreamConfig") -> None:
    """Raise ValueError naming ``where`` (e.g. ``ThalamusConfig.streams.2``) when a stream's
    clock, kind or capacity is invalid."""
    if stream.kind not in STREAM_KINDS:
        raise ValueError(f"{where}.kind={stream.kind!r} is not one of {', '.join(STREAM_KINDS)}")
    for key in ("clock", "capacity"):
        value = getattr(stream, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{key} must be an int >= 1, got {value!r}")
    if stream.kind == "episodic" and stream.clock != 1:
        raise ValueError(
            f"{where}.clock={stream.clock}: episodic streams write every step; "
            "set clock: 1 (clocks apply to mamba streams)"
        )


def default_streams() -> list[StreamConfig]:
    """A fast visual stream (half-lives ~1-7 steps) and a slow semantic one (~14-280 steps)."""
    return [
        StreamConfig(name="visual", dt_min=0.1, dt_max=0.5, A_init_min=1.0, A_init_max=2.0),
        StreamConfig(name="semantic", dt_min=0.005, dt_max=0.05, A_init_min=0.5, A_init_max=1.0),
    ]


@dataclass
class ThalamusConfig:
    """Sizes and switches of :class:`ThalamusCore` (serialisable with ``dataclasses.asdict``).

    :param d_model: token width (the tokenizer's output width) and stream width.
    :param d_task: width of the task vector.
    :param n_feedback_signals: number of raw reward signals per step (FeedbackLayer input).
    :param n_heads: heads of the gate's salience, the workspace and the stream readouts.
    :param top_k: tokens kept by the gate per step (K).
    :param phase_dim: phase angles per token (tags have ``2 * phase_dim`` entries).
    :param workspace_layers: phase-biased attention layers over the K kept tokens.
    :param workspace_mlp_ratio: MLP width of each workspace layer / ``d_model``; 0 = attention
        only. The MLP runs on all K tokens of every step, so it dominates the core's training
        FLOPs: 1.0 halves them against the usual 2.0 at little cost in capacity.
    :param d_workspace: width of the global workspace = the output features.
    :param streams: the Mamba-2 streams, each with its own time scale.
    :param n_iterations: feedback iterations (1 = no workspace feedback, no fatigue; 2 feeds
        the previous step's workspace back into the streams). 1 trains faster and learned
        DoorKey-5x5 faster (``configs/doorkey_5x5.yaml`` sets it), but learned MemoryS7's
        recall less often (``docs/measurements.md``, "n_iterations").
    :param fatigue_decay: EMA factor of the competition fatigue.
    :param init_fatigue_strength: initial strength κ of the (learned) fatigue term; small, so
        the competition starts without it (see :class:`DistributedMamba`).
    :param min_temperature: lower bound of the competition temperature.
    :param use_feedback: ablation switch: False removes the reward FeedbackLayer.
    :param gate_enabled: ablation switch: False keeps all tokens (no top-K).
    :param readout_salience_bias: the stream readouts add ``log`` of each kept token's gate
        weight to their attention logits (``s_j`` up to a constant per step), so salience
        decides how much of each token the streams read. Without it the readout's per-token
        LayerNorm cancels the weight's scale and the scorer learns only through the
        workspace's residual mix and the dropped tokens' summary (none at all with
        ``workspace_layers=0`` when K covers every token). Off by default: on DoorKey-5x5 it
        did not learn more reliably (``docs/measurements.md``, "readout_salience_bias").
    :param chunk_size: chunk length of the SSD scan (the same function at any length); the
        default is the fastest measured on PPO minibatches on a CPU
        (``docs/measurements.md``, "chunk_size").
    :param backend: ``"auto"``, ``"pure"`` or ``"kernel"`` (mamba-ssm, CUDA only); ``"auto"``
        takes the kernels on CUDA for long sequences only
        (:func:`~thalamus_rl.mamba2.use_kernel_path`).
    :param film_tokens: the task vector (the pooled mission) modulates every observation token
        before the gate by a :class:`~thalamus_rl.film.FiLM` (per-channel scale and shift), so
        what a cell *is* to the gate, the workspace and the readouts depends on the mission.
    :param film_gate: the task modulates the gate's salience query by a FiLM (after the
        feedback modulation).
    :param film_streams: the task modulates each stream's input by its own FiLM.
        All three start as the identity (a model with them on is, at initialisation, the
        same function as without) and are per step (step == sequence holds).
    """

    d_model: int = 64
    d_task: int = 64
    n_feedback_signals: int = 3
    n_heads: int = 4
    top_k: int = 16
    phase_dim: int = 8
    workspace_layers: int = 1
    workspace_mlp_ratio: float = 1.0
    d_workspace: int = 64
    streams: list[StreamConfig] = field(default_factory=default_streams)
    n_iterations: int = 2
    fatigue_decay: float = 0.9
    init_fatigue_strength: float = 0.01
    min_temperature: float = 0.05
    use_feedback: bool = True
    gate_enabled: bool = True
    readout_salience_bias: bool = False
    chunk_size: int = 32
    backend: str = "auto"
    film_tokens: bool = False
    film_gate: bool = False
    film_streams: bool = False

    def __post_init__(self) -> None:
        # Accept plain dicts for streams (YAML / OmegaConf / saved kwargs).
        self.streams = [
            s if isinstance(s, StreamConfig) else StreamConfig(**s) for s in self.streams
        ]
        for i, stream in enumerate(self.streams):
            check_stream_config(stream, f"ThalamusConfig.streams.{i}")
        for key in (
            "d_model",
            "d_task",
            "n_heads",
            "top_k",
            "phase_dim",
            "d_workspace",
            "n_iterations",
            "chunk_size",
            "n_feedback_signals",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ThalamusConfig.{key} must be a positive int, got {value!r}")
        if self.workspace_mlp_ratio < 0:
            raise ValueError(
                f"ThalamusConfig.workspace_mlp_ratio must be >= 0 (0 = no MLP), "
                f"got {self.workspace_mlp_ratio}"
            )
        if self.workspace_layers < 0:
            raise ValueError(
                f"ThalamusConfig.workspace_layers must be >= 0, got {self.workspace_layers}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ThalamusConfig.d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"ThalamusConfig.backend={self.backend!r} is not one of {', '.join(BACKENDS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
