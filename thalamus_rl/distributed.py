"""DistributedMamba: parallel Mamba-2 streams with their own time scales competing for a workspace.

Each feedback iteration ``i`` runs every stream over the whole sequence (a parallel scan),
lets the streams' votes compete by softmax, and writes the workspace ``w^(i)``. Iteration
``i + 1`` reads ``w^(i)_{t-1}`` (fed back into every stream) and a fatigue that is an EMA of
``α^(i)`` up to ``t - 1``. Nothing flows nonlinearly from ``t - 1`` to ``t`` within one
iteration (DESIGN.md rule 3), so the sequence pass and the step pass compute the same
function, and with ``I`` iterations information crosses streams ``I - 1`` times.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from thalamus_rl.config import StreamConfig, check_stream_config, default_streams
from thalamus_rl.mamba2 import (
    Mamba2Block,
    Mamba2State,
    RMSNormGated,
    blocks_fusable,
    mamba2_forward_multi,
    mamba2_step_multi,
    rms_norm_each,
)
from thalamus_rl.ssd import segment_ids, ssd_scan_chunked
from thalamus_rl.state import ClockedStreamState, EpisodicState, StreamState, ThalamusState

__all__ = [
    "StreamConfig",
    "StreamHook",
    "MambaStream",
    "EpisodicStream",
    "DistributedMamba",
    "build_stream",
    "default_streams",
    "episode_phase",
]


def episode_phase(phase0: Tensor, starts: Tensor | None, length: int) -> Tensor:
    """Steps since the episode start at every position of a sequence.

    :param phase0: ``[B]`` the phase of position 0 if it does not start an episode (an
        integer held in any dtype; a stored phase modulo ``k`` gives the phase modulo ``k``).
    :param starts: ``[B, T]`` bool or None. :return: ``[B, T]`` long.
    """
    steps = torch.arange(length, device=phase0.device)
    phase = phase0.round().long()[:, None] + steps
    if starts is None:
        return phase
    last_start = torch.where(starts, steps, -1).cummax(dim=1).values  # [B, T]
    return torch.where(last_start >= 0, steps - last_start, phase)


class MambaStream(nn.Module):
    """Pre-norm residual stack of :class:`Mamba2Block` s: ``h <- h + block(norm(h))``.

    With ``config.clock = k > 1`` the stream is *clocked*: it takes its input and updates its
    state only on the steps whose phase (steps since the episode start, kept in the state so
    that :meth:`step` knows it) is a multiple of ``k``, and repeats its last output in between.
    The sequence path gathers each row's clocked steps to the front (``[B, ~T/k, d]``, the
    rows' shorter tails padded with steps that leave the state unchanged: ``dt = 0`` in the
    scan, not in the conv window), runs the stack on them, and scatters the outputs back as
    held values. So the scan, the conv and the projections see exactly the subsampled
    sequence (the causal conv's taps are the previous *clocked* inputs), and training costs
    about ``1 / k`` of a clock-1 stream's compute. :meth:`step` computes the stack for every
    env and keeps the result where the clock ticks: rollouts save nothing. A clocked stream
    runs outside the fused multi-stream ops (:func:`mamba2_forward_multi`).

    :param d_model: stream width.
    :param config: the stream's sizes, time scale and clock.
    """

    def __init__(
        self, d_model: int, config: StreamConfig, chunk_size: int = 64, backend: str = "auto"
    ) -> None:
        super().__init__()
        if config.n_layers < 1:
            raise ValueError(
                f"stream {config.name!r}: n_layers must be >= 1, got {config.n_layers}"
            )
        check_stream_config(config, f"stream {config.name!r}")
        self.name = config.name
        self.clock = config.clock
        self.norms = nn.ModuleList(RMSNormGated(d_model) for _ in range(config.n_layers))
        self.blocks = nn.ModuleList(
            Mamba2Block(
                d_model,
                d_state=config.d_state,
                d_conv=config.d_conv,
                expand=config.expand,
                headdim=config.headdim,
                A_init_range=(config.A_init_min, config.A_init_max),
                dt_min=config.dt_min,
                dt_max=config.dt_max,
                chunk_size=chunk_size,
                backend=backend,
            )
            for _ in range(config.n_layers)
        )
        self.norm_out = RMSNormGated(d_model)

    def initial_state(
        self, batch_size: int, device=None, dtype=None
    ) -> tuple[Mamba2State, ...] | ClockedStreamState:
        layers = tuple(b.initial_state(batch_size, device, dtype) for b in self.blocks)
        if self.clock == 1:
            return layers
        ref = layers[0].ssm
        return ClockedStreamState(
            layers=layers,
            phase=ref.new_zeros(batch_size),
            held=ref.new_zeros(batch_size, self.blocks[0].d_model),
        )

    def half_lives(self) -> Tensor:
        """Half-lives in env steps of every head of every layer at the current parameters
        (a clocked stream's ticks are ``clock`` steps apart)."""
        return torch.cat([b.half_lives() for b in self.blocks]) * self.clock

    def _stack(
        self,
        x: Tensor,
        state: tuple[Mamba2State, ...],
        episode_starts: Tensor | None,
        n_valid: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Mamba2State, ...]]:
        new_state = []
        for norm, block, s in zip(self.norms, self.blocks, state, strict=True):
            y, s = block(norm(x), s, episode_starts, n_valid)
            x = x + y
            new_state.append(s)
        return self.norm_out(x), tuple(new_state)

    def _step_stack(
        self, x: Tensor, state: tuple[Mamba2State, ...], episode_starts: Tensor | None
    ) -> tuple[Tensor, tuple[Mamba2State, ...]]:
        new_state = []
        for norm, block, s in zip(self.norms, self.blocks, state, strict=True):
            y, s = block.step(norm(x), s, episode_starts)
            x = x + y
            new_state.append(s)
        return self.norm_out(x), tuple(new_state)

    def forward(
        self,
        x: Tensor,
        state: tuple[Mamba2State, ...] | ClockedStreamState,
        episode_starts: Tensor | None,
    ) -> tuple[Tensor, tuple[Mamba2State, ...] | ClockedStreamState]:
        """:param x: ``[B, T, d]``. :return: ``[B, T, d]`` and the new state."""
        if self.clock == 1:
            assert not isinstance(state, ClockedStreamState)
            return self._stack(x, state, episode_starts)
        assert isinstance(state, ClockedStreamState)
        batch, length, d = x.shape
        phase = episode_phase(state.phase, episode_starts, length) % self.clock  # [B, T]
        tick = phase == 0
        n_ticks = tick.sum(1)  # [B]
        ticks_so_far = tick.long().cumsum(1)  # [B, T], including t
        new_phase = ((phase[:, -1] + 1) % self.clock).to(state.phase.dtype)
        width = int(n_ticks.max())
        if width == 0:
            held = state.held[:, None].expand(batch, length, d)
            return held, ClockedStreamState(state.layers, new_phase, state.held)
        # Each row's clocked steps first, in time order (a stable sort of "not a tick").
        order = torch.sort((~tick).to(torch.int8), dim=1, stable=True).indices[:, :width]
        x_ticks = x.gather(1, order[..., None].expand(-1, -1, d))
        starts_ticks = None
        if episode_starts is not None:
            real = torch.arange(width, device=x.device) < n_ticks[:, None]
            starts_ticks = episode_starts.gather(1, order) & real
        y_ticks, layers = self._stack(x_ticks, state.layers, starts_ticks, n_ticks)
        last_tick = (ticks_so_far - 1).clamp(min=0)
        y = y_ticks.gather(1, last_tick[..., None].expand(-1, -1, d))
        y = torch.where((ticks_so_far > 0)[..., None], y, state.held[:, None])
        return y, ClockedStreamState(layers, new_phase, y[:, -1])

    def step(
        self,
        x: Tensor,
        state: tuple[Mamba2State, ...] | ClockedStreamState,
        episode_starts: Tensor | None,
    ) -> tuple[Tensor, tuple[Mamba2State, ...] | ClockedStreamState]:
        """:param x: ``[B, d]``. :return: ``[B, d]`` and the new state."""
        if self.clock == 1:
            assert not isinstance(state, ClockedStreamState)
            return self._step_stack(x, state, episode_starts)
        assert isinstance(state, ClockedStreamState)
        if episode_starts is not None:
            keep = (~episode_starts.bool()).to(x.dtype)
            state = pytree.tree_map(lambda t: t * keep.view(-1, *[1] * (t.ndim - 1)), state)
        tick = state.phase == 0  # [B]
        y, layers = self._step_stack(x, state.layers, None)
        y = torch.where(tick[:, None], y, state.held)
        layers = pytree.tree_map(
            lambda new, old: torch.where(tick.view(-1, *[1] * (new.ndim - 1)), new, old),
            layers,
            state.layers,
        )
        return y, ClockedStreamState(layers, (state.phase + 1) % self.clock, y)


class EpisodicStream(nn.Module):
    """Episodic memory: a bounded per-episode store of one key/value per step, read by
    attention with a learned, input-conditioned query.

    At every step ``t`` the stream writes ``(k_t, v_t) = W_kv LN(x_t)`` into the store, then
    reads it with ``q_t = q + W_q LN(x_t)`` (``q`` learned) by multi-head attention over the
    entries of the current episode (the one just written included), and outputs
    ``RMSNorm(x_t + W_o read_t)``. The store holds the episode's last ``capacity`` steps:
    a ring buffer, the oldest entry overwritten when it is full (FIFO), emptied at an episode
    start. The sequence path is the same function as a causal sliding window of ``capacity``
    steps within the episode (the stored entries of earlier calls included), at
    ``O(T (capacity + T))`` attention cost; memory is bounded: ``[B, capacity, d]`` keys and
    values in the state.

    :param d_model: stream width. :param config: ``name``, ``capacity`` and ``headdim`` (the
        attention head width; ``d_model`` must be a multiple of it).
    """

    def __init__(self, d_model: int, config: StreamConfig) -> None:
        super().__init__()
        check_stream_config(config, f"stream {config.name!r}")
        if config.headdim < 1 or d_model % config.headdim:
            raise ValueError(
                f"episodic stream {config.name!r}: d_model={d_model} must be a multiple of "
                f"headdim={config.headdim} (its attention head width)"
            )
        self.name = config.name
        self.capacity = config.capacity
        self.d_model = d_model
        self.n_heads = d_model // config.headdim
        self.norm_in = nn.LayerNorm(d_model)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.query = nn.Parameter(torch.randn(d_model) / math.sqrt(d_model))
        self.query_proj = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.norm_out = RMSNormGated(d_model)

    def initial_state(self, batch_size: int, device=None, dtype=None) -> EpisodicState:
        device = device if device is not None else self.query.device
        dtype = dtype or self.query.dtype
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        return EpisodicState(
            keys=zeros(batch_size, self.capacity, self.d_model),
            values=zeros(batch_size, self.capacity, self.d_model),
            filled=zeros(batch_size, self.capacity),
            pointer=zeros(batch_size),
        )

    def half_lives(self) -> Tensor:
        """None: the store does not decay (an empty tensor, for the per-stream dict)."""
        return self.query.new_zeros(0)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        h = self.norm_in(x)
        key, value = self.kv(h).chunk(2, dim=-1)
        return self.query + self.query_proj(h), key, value

    def _heads(self, t: Tensor) -> Tensor:
        """``[B, S, d]`` -> ``[B, H, S, d / H]``."""
        return t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)

    def _read(self, x: Tensor, query: Tensor, keys: Tensor, values: Tensor, mask: Tensor):
        """``query [B, T, d]`` over ``keys/values [B, S, d]`` where ``mask [B, T, S]``."""
        read = F.scaled_dot_product_attention(
            self._heads(query), self._heads(keys), self._heads(values), attn_mask=mask[:, None]
        )
        return self.norm_out(x + self.out(read.transpose(1, 2).flatten(-2)))

    def forward(
        self, x: Tensor, state: EpisodicState, episode_starts: Tensor | None
    ) -> tuple[Tensor, EpisodicState]:
        """:param x: ``[B, T, d]``. :return: ``[B, T, d]`` and the new state."""
        batch, length, d = x.shape
        cap = self.capacity
        query, key, value = self._project(x)
        steps = torch.arange(length, device=x.device)
        seg = segment_ids(episode_starts, batch, length, x.device)  # 0: the store's episode
        # Stored entry j was written `age_j` steps before position 0 (1 = the last step); at
        # position t it is still there iff the t + 1 writes since have not reached its slot.
        pointer = state.pointer.round().long()
        age = (pointer[:, None] - 1 - torch.arange(cap, device=x.device)) % cap + 1  # [B, cap]
        old_ok = (
            state.filled.bool()[:, None, :]
            & (seg == 0)[..., None]
            & (age[:, None, :] + steps[None, :, None] < cap)
        )  # [B, T, cap]
        lag = steps[:, None] - steps[None, :]  # t - s
        new_ok = ((lag >= 0) & (lag < cap))[None] & (seg[:, :, None] == seg[:, None, :])
        y = self._read(
            x,
            query,
            torch.cat([state.keys, key], dim=1),
            torch.cat([state.values, value], dim=1),
            torch.cat([old_ok, new_ok], dim=-1),
        )
        # The store after the call: the last `capacity` writes of the last episode segment,
        # each in slot phase % capacity; the old entries survive only without a reset.
        phase = episode_phase(state.pointer, episode_starts, length)
        last_seg = seg[:, -1:]
        kept = (seg == last_seg) & (steps >= length - cap)[None]
        slot = torch.where(kept, phase % cap, cap)  # slot `cap`: a scratch column, dropped
        no_reset = (last_seg == 0).to(x.dtype)  # [B, 1]

        def write(old: Tensor, new: Tensor) -> Tensor:
            old = old * no_reset.view(-1, *[1] * (old.ndim - 1))
            old = torch.cat([old, old[:, :1]], dim=1)
            index = slot.view(*slot.shape, *[1] * (new.ndim - 2)).expand_as(new)
            return old.scatter(1, index, new)[:, :cap]

        new_state = EpisodicState(
            keys=write(state.keys, key),
            values=write(state.values, value),
            filled=write(state.filled, torch.ones_like(phase, dtype=x.dtype)),
            pointer=((phase[:, -1] + 1) % cap).to(state.pointer.dtype),
        )
        return y, new_state

    def step(
        self, x: Tensor, state: EpisodicState, episode_starts: Tensor | None
    ) -> tuple[Tensor, EpisodicState]:
        """:param x: ``[B, d]``. :return: ``[B, d]`` and the new state."""
        if episode_starts is not None:
            keep = (~episode_starts.bool()).to(x.dtype)
            state = pytree.tree_map(lambda t: t * keep.view(-1, *[1] * (t.ndim - 1)), state)
        query, key, value = self._project(x)
        slot = F.one_hot(state.pointer.round().long(), self.capacity).to(x.dtype)  # [B, cap]
        keys = torch.lerp(state.keys, key[:, None].expand_as(state.keys), slot[..., None])
        values = torch.lerp(state.values, value[:, None].expand_as(state.values), slot[..., None])
        filled = torch.maximum(state.filled, slot)
        y = self._read(x[:, None], query[:, None], keys, values, filled.bool()[:, None])
        pointer = (state.pointer + 1) % self.capacity
        return y[:, 0], EpisodicState(keys, values, filled, pointer)


def build_stream(
    d_model: int, config: StreamConfig, chunk_size: int = 64, backend: str = "auto"
) -> MambaStream | EpisodicStream:
    """The stream module ``config.kind`` names."""
    if config.kind == "episodic":
        return EpisodicStream(d_model, config)
    return MambaStream(d_model, config, chunk_size, backend)


StreamHook = Callable[[int, Tensor, Tensor], None]
"""``hook(iteration, inputs, outputs)``, called by :class:`DistributedMamba` after each feedback
iteration has run its streams (``iteration`` from 0): ``inputs`` are what the streams read
(the per-stream readouts ``x``, plus the workspace feedback from iteration 1 on) and
``outputs`` what they wrote, both ``[B, T, M, d_model]`` (``[B, M, d_model]`` in a step), in
the order of ``stream_names``. A hook must not modify them."""


class DistributedMamba(nn.Module):
    """Named Mamba-2 streams competing for a global workspace, with workspace feedback from
    the second iteration on (``n_iterations >= 2``).

    Per iteration ``i`` and step ``t``::

        u_m   = x_m + F_m w^(i-1)_{t-1}                   (no feedback term when i = 1)
        v_m   = V_m stream_m(u_m)                          votes, [d_workspace]
        α     = softmax((score(v_m) - κ fatigue_m) / τ)    τ = τ_min + softplus(ρ), learnable
        w^(i) = LayerNorm(Σ_m α_m v_m)
        fatigue^(i+1)_t = β fatigue^(i+1)_{t-1} + (1 - β) α^(i)_{t-1}

    The fatigue strength ``κ = softplus(ρ_κ) >= 0`` is learned and starts small
    (``init_fatigue_strength``): at full strength from the first update (κ = 1) the O(1)
    fatigue term dominates the untrained scores, makes the workspace a time-varying mix of the
    streams within an episode, and the policy fits the advantage noise of the reward-free
    early rollouts until it stops exploring (``docs/measurements.md``, "fatigue"). Starting
    near 0 lets the competition learn how much inhibition of the recent winner helps.

    :param d_model: width of each stream's input and of the streams.
    :param streams: stream configs (names must be unique).
    :param d_workspace: workspace width (the output features).
    :param n_iterations: feedback iterations ``I`` (1 = no feedback, no fatigue).
    :param fatigue_decay: EMA factor ``β`` of the fatigue, in [0, 1).
    :param min_temperature: lower bound of τ (keeps the softmax away from argmax).
    :param init_fatigue_strength: initial fatigue strength κ (> 0).

    >>> dm = DistributedMamba(d_model=16, streams=default_streams(), d_workspace=8)
    >>> w, alpha, state = dm(torch.randn(2, 5, 2, 16))
    >>> w.shape, alpha.shape
    (torch.Size([2, 5, 8]), torch.Size([2, 5, 2]))
    """

    def __init__(
        self,
        d_model: int,
        streams: list[StreamConfig] | None = None,
        d_workspace: int = 64,
        n_iterations: int = 2,
        fatigue_decay: float = 0.9,
        min_temperature: float = 0.05,
        chunk_size: int = 64,
        backend: str = "auto",
        init_fatigue_strength: float = 0.01,
    ) -> None:
        super().__init__()
        streams = list(streams) if streams is not None else default_streams()
        if not streams:
            raise ValueError("DistributedMamba needs at least one stream")
        names = [s.name for s in streams]
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique, got {names}")
        if n_iterations < 1:
            raise ValueError(f"n_iterations must be >= 1, got {n_iterations}")
        if not 0.0 <= fatigue_decay < 1.0:
            raise ValueError(f"fatigue_decay must be in [0, 1), got {fatigue_decay}")
        if min_temperature <= 0:
            raise ValueError(f"min_temperature must be > 0, got {min_temperature}")
        if not init_fatigue_strength > 0:
            raise ValueError(f"init_fatigue_strength must be > 0, got {init_fatigue_strength}")
        self.d_model = d_model
        self.d_workspace = d_workspace
        self.n_iterations = n_iterations
        self.n_streams = len(streams)
        self.stream_names = tuple(names)
        self.fatigue_decay = fatigue_decay
        self.min_temperature = min_temperature
        self.streams = nn.ModuleList(build_stream(d_model, s, chunk_size, backend) for s in streams)
        # Votes: each stream projects its output into the workspace.
        self.vote = nn.ModuleList(nn.Linear(d_model, d_workspace) for _ in streams)
        self.score = nn.Linear(d_workspace, 1)
        # Workspace feedback into each stream (iterations >= 2); small init so that the
        # feedback starts as a perturbation of the feed-forward streams. Not zero: a zero init
        # (two iterations then start as exactly one) learned DoorKey-5x5 slower
        # (docs/measurements.md, "feedback init").
        self.feedback = (
            nn.ModuleList(nn.Linear(d_workspace, d_model, bias=False) for _ in streams)
            if n_iterations > 1
            else None
        )
        for lin in self.feedback or ():
            nn.init.normal_(lin.weight, std=0.1 / math.sqrt(d_workspace))
        # τ = min_temperature + softplus(ρ), initialised to τ = 1.
        self.temperature_raw = nn.Parameter(
            torch.tensor(math.log(math.expm1(1.0 - min_temperature)))
        )
        # κ = softplus(ρ_κ): how strongly the recent winner is inhibited (see the class doc);
        # there is no fatigue, so no κ, with one iteration.
        self.fatigue_strength_raw = (
            nn.Parameter(torch.tensor(math.log(math.expm1(init_fatigue_strength))))
            if n_iterations > 1
            else None
        )
        self.norm = nn.LayerNorm(d_workspace)
        # Read-only observers of the streams (register_stream_hook); not parameters, not saved.
        self._stream_hooks: OrderedDict[int, StreamHook] = OrderedDict()
        # Streams of the same sizes (time scales may differ) run as one set of ops, layer by
        # layer (mamba2_forward_multi); the per-stream loop is the reference and the path for
        # streams of different sizes and for the CUDA kernels. Tests compare the two.
        # Clocked and episodic streams run one by one.
        plain = all(isinstance(s, MambaStream) and s.clock == 1 for s in self.streams)
        self.fuse_streams = (
            plain
            and len({len(s.blocks) for s in self.streams}) == 1
            and all(
                blocks_fusable([s.blocks[i] for s in self.streams])
                for i in range(len(self.streams[0].blocks))
            )
        )

    @property
    def temperature(self) -> Tensor:
        """The competition temperature τ (scalar, > min_temperature)."""
        return self.min_temperature + F.softplus(self.temperature_raw)

    @property
    def fatigue_strength(self) -> Tensor:
        """The fatigue strength κ (scalar, >= 0; 0 with one iteration, which has no fatigue)."""
        if self.fatigue_strength_raw is None:
            return self.temperature_raw.new_zeros(())
        return F.softplus(self.fatigue_strength_raw)

    def register_stream_hook(self, hook: StreamHook) -> RemovableHandle:
        """Call ``hook`` with every iteration's stream inputs and outputs (:data:`StreamHook`),
        in :meth:`forward` and :meth:`step`, until ``handle.remove()``. The tensors are the
        ones the module computes with, so a hook reads the streams without changing anything
        (a diagnosis: which stream holds what). Register it on an eager core: what a
        ``torch.compile``'d call does with a Python hook is not tested (the memory diagnosis
        turns ``compile_core`` off while it records)."""
        handle = RemovableHandle(self._stream_hooks)
        self._stream_hooks[handle.id] = hook
        return handle

    def _call_stream_hooks(self, iteration: int, inputs: Tensor, outputs: Tensor) -> None:
        for hook in self._stream_hooks.values():
            hook(iteration, inputs, outputs)

    def half_lives(self) -> dict[str, Tensor]:
        """Per stream, the state half-lives (steps) of all its heads at the current parameters."""
        return {s.name: s.half_lives() for s in self.streams}

    def initial_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ThalamusState:
        """Zero state for ``batch_size`` sequences."""
        device = device if device is not None else self.score.weight.device
        dtype = dtype or self.score.weight.dtype
        n_prev = self.n_iterations - 1
        return ThalamusState(
            mamba=tuple(
                tuple(s.initial_state(batch_size, device, dtype) for s in self.streams)
                for _ in range(self.n_iterations)
            ),
            prev_workspace=torch.zeros(
                batch_size, n_prev, self.d_workspace, device=device, dtype=dtype
            ),
            prev_weights=torch.zeros(
                batch_size, n_prev, self.n_streams, device=device, dtype=dtype
            ),
            fatigue=torch.zeros(batch_size, n_prev, self.n_streams, device=device, dtype=dtype),
        )

    def _compete(self, outputs: Tensor, fatigue: Tensor | None) -> tuple[Tensor, Tensor]:
        """Votes compete: ``outputs: [..., M, d_model]``, ``fatigue: [..., M]`` ->
        (workspace ``[..., d_workspace]``, weights ``[..., M]``)."""
        votes = torch.einsum(
            "...md,mwd->...mw", outputs, torch.stack([v.weight for v in self.vote])
        ) + torch.stack([v.bias for v in self.vote])
        scores = self.score(votes).squeeze(-1)  # [..., M]
        if fatigue is not None:
            scores = scores - self.fatigue_strength * fatigue
        alpha = torch.softmax(scores / self.temperature, dim=-1)
        workspace = self.norm((alpha[..., None] * votes).sum(-2))
        return workspace, alpha

    def _feedback_input(self, w_prev: Tensor) -> Tensor:
        """``F_m w_prev`` for every stream: ``[..., d_workspace]`` -> ``[..., M, d_model]``."""
        assert self.feedback is not None  # only iterations >= 2 read the workspace
        weight = torch.cat([fb.weight for fb in self.feedback])  # [M * d_model, d_workspace]
        return F.linear(w_prev, weight).unflatten(-1, (self.n_streams, self.d_model))

    def _run_streams(
        self,
        u: Tensor,
        states: tuple[StreamState, ...],
        starts: Tensor | None,
        step: bool,
    ) -> tuple[Tensor, tuple[StreamState, ...]]:
        """Every stream on its input: ``u: [B, T, M, d]`` (``[B, M, d]`` with ``step``) ->
        outputs of the same shape and the new per-stream, per-layer states."""
        fused = self.fuse_streams and (step or not self.streams[0].blocks[0]._use_kernel(u))
        if not fused:
            outputs, new_states = [], []
            for m, (stream, s) in enumerate(zip(self.streams, states, strict=True)):
                y, s = stream.step(u[:, m], s, None) if step else stream(u[..., m, :], s, starts)
                outputs.append(y)
                new_states.append(s)
            return torch.stack(outputs, dim=-2), tuple(new_states)
        per_stream: list[list[Mamba2State]] = [[] for _ in self.streams]
        for i in range(len(self.streams[0].blocks)):
            blocks = [s.blocks[i] for s in self.streams]
            layer_states = [s[i] for s in states]
            h = rms_norm_each(u, [s.norms[i] for s in self.streams])
            if step:
                y, new = mamba2_step_multi(blocks, h, layer_states)
            else:
                y, new = mamba2_forward_multi(blocks, h, layer_states, starts)
            u = u + y
            for m, s in enumerate(new):
                per_stream[m].append(s)
        out = rms_norm_each(u, [s.norm_out for s in self.streams])
        return out, tuple(tuple(s) for s in per_stream)

    def _check(self, x: Tensor, ndim: int, state: ThalamusState | None) -> None:
        want = "[B, T, M, d_model]" if ndim == 4 else "[B, M, d_model]"
        if x.ndim != ndim or x.shape[-2] != self.n_streams or x.shape[-1] != self.d_model:
            raise ValueError(
                f"DistributedMamba expects x of shape {want} with M={self.n_streams} streams "
                f"{self.stream_names} and d_model={self.d_model}, got {tuple(x.shape)}"
            )
        if state is not None and state.batch_size != x.shape[0]:
            raise ValueError(
                f"state batch size {state.batch_size} != input batch size {x.shape[0]}"
            )

    def forward(
        self,
        x: Tensor,
        state: ThalamusState | None = None,
        episode_starts: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, ThalamusState]:
        """Run a whole sequence.

        :param x: ``[B, T, M, d_model]`` one input per stream and step.
        :param state: state before step 0, or None (zeros).
        :param episode_starts: ``[B, T]`` bool, True where observation t starts an episode.
        :return: workspace ``[B, T, d_workspace]``, stream weights ``α [B, T, M]`` of the
            last iteration, and the state after the last step.
        """
        self._check(x, 4, state)
        batch, length = x.shape[:2]
        if state is None:
            state = self.initial_state(batch, x.device, x.dtype)
        starts = None if episode_starts is None else episode_starts.to(torch.bool)
        keep = None if starts is None else (~starts).to(x.dtype)[..., None]  # [B, T, 1]
        new_mamba, new_prev_w, new_prev_a, new_fatigue = [], [], [], []
        workspace = alpha = None
        for it in range(self.n_iterations):
            inputs = x
            fatigue = None
            if it > 0:
                j = it - 1
                # w^(it-1)_{t-1} and α^(it-1)_{t-1}: shift right by one, zero across resets.
                w_prev = torch.cat([state.prev_workspace[:, None, j], workspace[:, :-1]], dim=1)
                a_prev = torch.cat([state.prev_weights[:, None, j], alpha[:, :-1]], dim=1)
                if keep is not None:
                    w_prev = w_prev * keep
                    a_prev = a_prev * keep
                inputs = x + self._feedback_input(w_prev)
                fatigue = self._fatigue_scan(a_prev, state.fatigue[:, j], starts)
                new_prev_w.append(workspace[:, -1])
                new_prev_a.append(alpha[:, -1])
                new_fatigue.append(fatigue[:, -1])
            outputs, stream_states = self._run_streams(inputs, state.mamba[it], starts, False)
            if self._stream_hooks:
                self._call_stream_hooks(it, inputs, outputs)
            new_mamba.append(stream_states)
            workspace, alpha = self._compete(outputs, fatigue)
        return workspace, alpha, self._pack(new_mamba, new_prev_w, new_prev_a, new_fatigue, state)

    def _fatigue_scan(self, a_prev: Tensor, fatigue0: Tensor, starts: Tensor | None) -> Tensor:
        """``g_t = β g_{t-1} + (1 - β) a_prev_t`` with ``g`` zeroed at episode starts.

        A linear recurrence, run as a one-head SSD scan. :param a_prev: ``[B, T, M]``
        (``α_{t-1}``, already zero at starts); :param fatigue0: ``[B, M]`` (``g_{-1}``).
        :return: ``[B, T, M]``.
        """
        batch, length, n = a_prev.shape
        beta = self.fatigue_decay
        if beta == 0.0:
            return a_prev
        log_beta = torch.full(
            (batch, length, 1), math.log(beta), device=a_prev.device, dtype=a_prev.dtype
        )
        ones = a_prev.new_ones(batch, length, 1, 1)
        g, _ = ssd_scan_chunked(
            ((1.0 - beta) * a_prev)[:, :, None, :],
            log_beta,
            ones,
            ones,
            initial_state=fatigue0[:, None, :, None],
            resets=starts,
        )
        return g[:, :, 0]

    def _pack(self, mamba, prev_w, prev_a, fatigue, like: ThalamusState) -> ThalamusState:
        if self.n_iterations == 1:
            return ThalamusState(tuple(mamba), like.prev_workspace, like.prev_weights, like.fatigue)
        return ThalamusState(
            mamba=tuple(mamba),
            prev_workspace=torch.stack(prev_w, dim=1),
            prev_weights=torch.stack(prev_a, dim=1),
            fatigue=torch.stack(fatigue, dim=1),
        )

    def step(
        self,
        x: Tensor,
        state: ThalamusState | None = None,
        episode_starts: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, ThalamusState]:
        """One time step; ``step`` T times equals :meth:`forward` once.

        :param x: ``[B, M, d_model]``.
        :param episode_starts: ``[B]`` bool.
        :return: workspace ``[B, d_workspace]``, weights ``[B, M]``, new state.
        """
        self._check(x, 3, state)
        batch = x.shape[0]
        if state is None:
            state = self.initial_state(batch, x.device, x.dtype)
        if episode_starts is not None and bool(episode_starts.any()):
            state = state.mask(episode_starts)
        beta = self.fatigue_decay
        new_mamba, new_prev_w, new_prev_a, new_fatigue = [], [], [], []
        workspace = alpha = None
        for it in range(self.n_iterations):
            inputs = x
            fatigue = None
            if it > 0:
                j = it - 1
                w_prev = state.prev_workspace[:, j]
                inputs = x + self._feedback_input(w_prev)
                fatigue = beta * state.fatigue[:, j] + (1.0 - beta) * state.prev_weights[:, j]
                new_prev_w.append(workspace)
                new_prev_a.append(alpha)
                new_fatigue.append(fatigue)
            # The state is already masked; the blocks need no episode_starts.
            outputs, stream_states = self._run_streams(inputs, state.mamba[it], None, True)
            if self._stream_hooks:
                self._call_stream_hooks(it, inputs, outputs)
            new_mamba.append(stream_states)
            workspace, alpha = self._compete(outputs, fatigue)
        return workspace, alpha, self._pack(new_mamba, new_prev_w, new_prev_a, new_fatigue, state)
