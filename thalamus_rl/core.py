"""ThalamusCore: tokens in, a recurrent feature vector out.

``tokens -> PhaseGate (top-K) -> PhaseWorkspace -> per-stream readout -> DistributedMamba``.
Everything before DistributedMamba is per time step, so a sequence runs it on all
``B*T`` steps at once; DistributedMamba is the only recurrent part (DESIGN.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thalamus_rl.distributed import DistributedMamba, StreamConfig, default_streams
from thalamus_rl.film import FiLM
from thalamus_rl.gate import PhaseGate
from thalamus_rl.mamba2 import BACKENDS
from thalamus_rl.state import ThalamusState
from thalamus_rl.workspace import PhaseWorkspace

__all__ = ["ThalamusConfig", "ThalamusCore", "ThalamusOutput"]


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
        the previous step's workspace back into the streams). 1 trains ~1.1x faster and
        learned DoorKey-5x5 faster (median eval reward at 100k 0.93 against 0.49 over the
        same 13 seeds; ``configs/doorkey_5x5.yaml`` sets it), but learned MemoryS7's recall
        in 1 of 6 runs against 2 of 3 (the ablation suite and
        ``docs/benchmarks/archive/one-iteration``; the README's Status).
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
        ``workspace_layers=0`` when K covers every token). Off: on DoorKey-5x5 (seeds 0-12,
        one iteration, 100k steps) it gave median eval reward 0.95 with 8 of 13 reaching 0.9,
        against 0.93 and 9 of 13 without, and 4 seeds ended under 0.6 (1 without).
    :param chunk_size: chunk length of the SSD scan (the same function at any length). 32 ran
        DistributedMamba's forward + backward ~10% faster than 64 on PPO minibatches
        (B=2, T=128, one CPU thread: 19.7-21.0 ms vs 21.9-22.8 ms; 16 was no faster).
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


class ThalamusOutput(NamedTuple):
    """What the core returns beside the state; leading dims ``[B, T]`` (forward) or ``[B]`` (step).

    :ivar features: ``[..., d_workspace]`` the workspace, input of the actor and critic heads.
    :ivar salience: ``[..., N]`` gate logits (``-inf`` at masked tokens).
    :ivar indices: ``[..., K]`` long, the selected tokens (by salience, descending).
    :ivar gate_weights: ``[..., K]`` weights of the kept tokens (0 where a slot is empty).
    :ivar phase: ``[..., K, 2P]`` phase tags of the kept tokens.
    :ivar stream_weights: ``[..., M]`` competition weights α of the last iteration.
    :ivar stats: scalar diagnostics (detached) for logging under ``thalamus/*``; empty when
        the call asked for none (``with_stats=False``).
    """

    features: Tensor
    salience: Tensor
    indices: Tensor
    gate_weights: Tensor
    phase: Tensor
    stream_weights: Tensor
    stats: dict[str, Tensor]


class StreamReadout(nn.Module):
    """Each stream pools the K kept tokens with its own learned query, conditioned on the
    gate's task/feedback query, so streams can read different tokens.

    :param d_model: token width. :param n_streams: M. :param n_heads: attention heads.
    """

    def __init__(self, d_model: int, n_streams: int, n_heads: int) -> None:
        super().__init__()
        self.n_streams = n_streams
        self.n_heads = n_heads
        self.queries = nn.Parameter(torch.randn(n_streams, d_model) / math.sqrt(d_model))
        self.query_cond = nn.Linear(d_model, n_streams * d_model, bias=False)
        self.norm = nn.LayerNorm(d_model)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.context = nn.Linear(2 * d_model, n_streams * d_model)

    def forward(
        self,
        tokens: Tensor,
        mask: Tensor,
        query: Tensor,
        rest: Tensor,
        weights: Tensor | None = None,
    ) -> Tensor:
        """:param tokens: ``[S, K, d]``; :param mask: ``[S, K]`` bool;
        :param query: ``[S, d]`` the gate's task/feedback query;
        :param rest: ``[S, d]`` the gate's summary of the dropped tokens;
        :param weights: ``[S, K]`` optional gate weights (> 0 where ``mask``); ``log(weights)``
            is added to every head's attention logits.
        :return: ``[S, M, d]`` one input per stream."""
        steps, k, d = tokens.shape
        m, h = self.n_streams, self.n_heads
        q = self.queries + self.query_cond(query).view(steps, m, d)  # [S, M, d]
        key, value = self.kv(self.norm(tokens)).chunk(2, dim=-1)
        q = q.view(steps, m, h, d // h).transpose(1, 2)
        key = key.view(steps, k, h, d // h).transpose(1, 2)
        value = value.view(steps, k, h, d // h).transpose(1, 2)
        # Every row has at least one kept token (the gate raises otherwise).
        if weights is None:
            attn_mask = mask[:, None, None, :]
        else:
            # A float mask is added to the logits; clamp keeps log finite at empty slots.
            bias = weights.clamp_min(torch.finfo(weights.dtype).tiny).log()
            attn_mask = bias.masked_fill(~mask, float("-inf"))[:, None, None, :]
        pooled = F.scaled_dot_product_attention(q, key, value, attn_mask=attn_mask)
        pooled = pooled.transpose(1, 2).reshape(steps, m, d)
        context = self.context(torch.cat([query, rest], dim=-1)).view(steps, m, d)
        return self.out(pooled) + context


class ThalamusCore(nn.Module):
    """The thalamus: gate, workspace, readouts and DistributedMamba, from tokens to features.

    >>> core = ThalamusCore(ThalamusConfig(d_model=32, d_task=16, top_k=4, d_workspace=16))
    >>> out, state = core(torch.randn(2, 3, 10, 32), torch.ones(2, 3, 10, dtype=torch.bool),
    ...                   torch.randn(2, 3, 16), torch.zeros(2, 3, 3))
    >>> out.features.shape, out.indices.shape, out.stream_weights.shape
    (torch.Size([2, 3, 16]), torch.Size([2, 3, 4]), torch.Size([2, 3, 2]))
    """

    def __init__(self, config: ThalamusConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if config is None:
            config = ThalamusConfig(**overrides)
        elif overrides:
            config = ThalamusConfig(**{**asdict(config), **overrides})
        self.config = config
        c = config
        self.gate = PhaseGate(
            d_model=c.d_model,
            d_task=c.d_task,
            n_heads=c.n_heads,
            top_k=c.top_k,
            phase_dim=c.phase_dim,
            n_feedback_signals=c.n_feedback_signals,
            use_feedback=c.use_feedback,
            enabled=c.gate_enabled,
            film_query=c.film_gate,
        )
        self.token_film = FiLM(c.d_task, c.d_model) if c.film_tokens else None
        self.workspace = (
            PhaseWorkspace(
                c.d_model,
                n_heads=c.n_heads,
                n_layers=c.workspace_layers,
                phase_dim=c.phase_dim,
                mlp_ratio=c.workspace_mlp_ratio,
            )
            if c.workspace_layers > 0
            else None
        )
        self.readout = StreamReadout(c.d_model, len(c.streams), c.n_heads)
        self.streams = DistributedMamba(
            d_model=c.d_model,
            streams=c.streams,
            d_workspace=c.d_workspace,
            n_iterations=c.n_iterations,
            fatigue_decay=c.fatigue_decay,
            init_fatigue_strength=c.init_fatigue_strength,
            min_temperature=c.min_temperature,
            chunk_size=c.chunk_size,
            backend=c.backend,
        )
        self.stream_film = (
            FiLM(c.d_task, c.d_model, n_groups=len(c.streams)) if c.film_streams else None
        )

    @property
    def features_dim(self) -> int:
        return self.config.d_workspace

    @property
    def stream_names(self) -> tuple[str, ...]:
        return self.streams.stream_names

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ThalamusState:
        """Zero state for ``batch_size`` envs."""
        return self.streams.initial_state(batch_size, device, dtype)

    # ------------------------------------------------------------------ per-step part
    def _per_step(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        task: Tensor,
        feedback: Tensor,
        positions: Tensor | None,
    ):
        """Gate, workspace and readouts on a flat batch of steps ``[S, ...]``."""
        if self.token_film is not None:
            tokens = self.token_film(tokens, task)
        gate = self.gate(tokens, task, feedback, token_mask, positions)
        kept = gate.tokens
        if self.workspace is not None:
            kept = self.workspace(kept, gate.phase, gate.kept_mask)
        weights = gate.weights if self.config.readout_salience_bias else None
        stream_in = self.readout(kept, gate.kept_mask, gate.query, gate.rest, weights)
        if self.stream_film is not None:
            stream_in = self.stream_film(stream_in, task)
        return gate, stream_in

    def _check(
        self, tokens: Tensor, token_mask: Tensor, task: Tensor, feedback: Tensor, ndim: int
    ) -> None:
        lead = "[B, T" if ndim == 4 else "[B"
        c = self.config
        if tokens.ndim != ndim or tokens.shape[-1] != c.d_model:
            raise ValueError(
                f"tokens must be {lead}, N, d_model={c.d_model}], got {tuple(tokens.shape)}"
            )
        prefix = tokens.shape[:-2]
        if token_mask.shape != tokens.shape[:-1]:
            raise ValueError(
                f"token_mask must be {lead}, N] = {tuple(tokens.shape[:-1])}, "
                f"got {tuple(token_mask.shape)}"
            )
        if task.shape != (*prefix, c.d_task):
            raise ValueError(f"task must be {lead}, d_task={c.d_task}], got {tuple(task.shape)}")
        if feedback.shape != (*prefix, c.n_feedback_signals):
            raise ValueError(
                f"feedback must be {lead}, n_feedback_signals={c.n_feedback_signals}], "
                f"got {tuple(feedback.shape)}"
            )

    def forward(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        task: Tensor,
        feedback: Tensor,
        positions: Tensor | None = None,
        state: ThalamusState | None = None,
        episode_starts: Tensor | None = None,
        with_stats: bool = True,
    ) -> tuple[ThalamusOutput, ThalamusState]:
        """Run a whole sequence (training).

        :param tokens: ``[B, T, N, d_model]``.
        :param token_mask: ``[B, T, N]`` bool, True = valid token.
        :param task: ``[B, T, d_task]``.
        :param feedback: ``[B, T, n_feedback_signals]`` raw reward signals.
        :param positions: ``[B, T, N, 2]`` 2-D token positions in [0, 1], or None (zeros).
        :param state: state before step 0, or None (zeros).
        :param episode_starts: ``[B, T]`` bool, True where observation t starts an episode.
        :param with_stats: compute ``ThalamusOutput.stats`` (False: an empty dict; they cost
            ~30 small ops, 12% of a rollout step at 8 envs).
        :return: :class:`ThalamusOutput` with ``[B, T, ...]`` fields, and the final state.
        """
        self._check(tokens, token_mask, task, feedback, 4)
        batch, length, n = tokens.shape[:3]
        flat = lambda t: None if t is None else t.reshape(batch * length, *t.shape[2:])  # noqa: E731
        gate, stream_in = self._per_step(
            flat(tokens), flat(token_mask), flat(task), flat(feedback), flat(positions)
        )
        stream_in = stream_in.view(batch, length, *stream_in.shape[1:])
        workspace, alpha, state = self.streams(stream_in, state, episode_starts)
        unflat = lambda t: t.view(batch, length, *t.shape[1:])  # noqa: E731
        mask = token_mask.reshape(-1, n)
        return self._output(workspace, alpha, gate, mask, unflat, with_stats), state

    def step(
        self,
        tokens: Tensor,
        token_mask: Tensor,
        task: Tensor,
        feedback: Tensor,
        positions: Tensor | None = None,
        state: ThalamusState | None = None,
        episode_starts: Tensor | None = None,
        with_stats: bool = True,
    ) -> tuple[ThalamusOutput, ThalamusState]:
        """One env step (rollouts); ``step`` T times equals :meth:`forward` once.

        Shapes as in :meth:`forward` without the ``T`` dimension; ``episode_starts: [B]``.
        """
        self._check(tokens, token_mask, task, feedback, 3)
        gate, stream_in = self._per_step(tokens, token_mask, task, feedback, positions)
        workspace, alpha, state = self.streams.step(stream_in, state, episode_starts)
        return self._output(workspace, alpha, gate, token_mask, lambda t: t, with_stats), state

    def _output(self, workspace, alpha, gate, mask, unflat, with_stats: bool) -> ThalamusOutput:
        return ThalamusOutput(
            features=workspace,
            salience=unflat(gate.salience),
            indices=unflat(gate.indices),
            gate_weights=unflat(gate.weights),
            phase=unflat(gate.phase),
            stream_weights=alpha,
            stats=self._stats(gate, mask, alpha) if with_stats else {},
        )

    @torch.no_grad()
    def _stats(self, gate, mask: Tensor, alpha: Tensor) -> dict[str, Tensor]:
        """Scalar diagnostics: how peaked the gate is, what it keeps, who wins the workspace."""
        kept = gate.kept_mask
        selected = gate.salience.gather(-1, gate.indices).masked_fill(~kept, 0.0)
        stats = {
            "gate_entropy": PhaseGate.entropy(gate.salience, mask).mean(),
            "selected_salience": selected.sum() / kept.sum().clamp(min=1),
            "temperature": self.streams.temperature.detach(),
        }
        if self.streams.n_iterations > 1:
            stats["fatigue_strength"] = self.streams.fatigue_strength.detach()
        if self.workspace is not None:
            stats["phase_scale"] = self.workspace.phase_scale.detach().mean()
        if self.gate.feedback_layer is not None:
            stats["feedback_gain"] = self.gate.feedback_layer.gain.detach().reshape(())
        for where, film in (
            ("tokens", self.token_film),
            ("gate", self.gate.query_film),
            ("streams", self.stream_film),
        ):
            if film is not None:  # how far each FiLM has moved from the identity (0 at init)
                stats[f"film/{where}_norm"] = film.proj.weight.detach().norm()
        mean_alpha = alpha.reshape(-1, alpha.shape[-1]).mean(0)
        for name, value in zip(self.stream_names, mean_alpha, strict=True):
            stats[f"stream_weight/{name}"] = value
        return stats
