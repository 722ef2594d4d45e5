"""ThalamusCore: tokens in, a recurrent feature vector out.

``tokens -> PhaseGate (top-K) -> PhaseWorkspace -> per-stream readout -> DistributedMamba``.
Everything before DistributedMamba is per time step, so a sequence runs it on all
``B*T`` steps at once; DistributedMamba is the only recurrent part (DESIGN.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thalamus_rl.config import ThalamusConfig
from thalamus_rl.distributed import DistributedMamba
from thalamus_rl.film import FiLM
from thalamus_rl.gate import PhaseGate
from thalamus_rl.state import ThalamusState
from thalamus_rl.workspace import PhaseWorkspace

__all__ = ["ThalamusConfig", "ThalamusCore", "ThalamusOutput"]


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
        self,
        tokens: Tensor,
        token_mask: Tensor,
        task: Tensor,
        feedback: Tensor,
        ndim: int,
        positions: Tensor | None = None,
        episode_starts: Tensor | None = None,
    ) -> None:
        lead = "[B, T" if ndim == 4 else "[B"
        c = self.config
        if tokens.ndim != ndim or tokens.shape[-1] != c.d_model:
            raise ValueError(
                f"tokens must be {lead}, N, d_model={c.d_model}], got {tuple(tokens.shape)}"
            )
        prefix = tokens.shape[:-2]
        if ndim == 4 and tokens.shape[1] == 0:
            raise ValueError(
                f"tokens have T = 0 steps ({tuple(tokens.shape)}): a sequence needs at least one"
            )
        if tokens.shape[-2] == 0:
            raise ValueError(f"tokens have N = 0 tokens per step ({tuple(tokens.shape)})")
        dtype = self.gate.key_proj.weight.dtype
        for name, value in (("tokens", tokens), ("task", task), ("feedback", feedback)):
            if value.dtype != dtype:
                raise ValueError(
                    f"{name} must be {dtype} like the core's parameters, got {value.dtype} "
                    f"(convert with .to({dtype}) or the core with .to({value.dtype}))"
                )
        if token_mask.dtype != torch.bool:
            raise ValueError(f"token_mask must be bool (True = valid), got {token_mask.dtype}")
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
        if positions is not None and positions.shape != (*tokens.shape[:-1], 2):
            raise ValueError(
                f"positions must be {lead}, N, 2] = {(*tuple(tokens.shape[:-1]), 2)}, "
                f"got {tuple(positions.shape)}"
            )
        if episode_starts is not None and episode_starts.shape != prefix:
            raise ValueError(
                f"episode_starts must be {lead}] = {tuple(prefix)} (one flag per env"
                f"{' and step' if ndim == 4 else ''}), got {tuple(episode_starts.shape)}"
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
        :param with_stats: compute ``ThalamusOutput.stats`` (False: an empty dict; they are
            ~30 small ops, a noticeable share of a rollout step: ``docs/measurements.md``).
        :return: :class:`ThalamusOutput` with ``[B, T, ...]`` fields, and the final state.
        """
        self._check(tokens, token_mask, task, feedback, 4, positions, episode_starts)
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
        self._check(tokens, token_mask, task, feedback, 3, positions, episode_starts)
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
