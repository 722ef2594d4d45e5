"""The thalamus' recurrent state: one typed pytree, batch first."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from thalamus_rl.mamba2 import Mamba2State

__all__ = ["ClockedStreamState", "EpisodicState", "StreamState", "ThalamusState"]


class ClockedStreamState(NamedTuple):
    """State of a Mamba stream with ``clock = k > 1`` (:class:`~thalamus_rl.MambaStream`).

    :param layers: the per-layer :class:`Mamba2State` s, as of the stream's last clocked step.
    :param phase: ``[B]`` steps since the episode start, modulo ``k`` (a float holding an
        integer, so the state flattens into one float tensor); the stream's clock ticks when
        it is 0. Zero at an episode start, so masking restarts the clock.
    :param held: ``[B, d_model]`` the stream's output at its last clocked step, repeated in
        between.
    """

    layers: tuple[Mamba2State, ...]
    phase: Tensor
    held: Tensor


class EpisodicState(NamedTuple):
    """State of an episodic-memory stream (:class:`~thalamus_rl.EpisodicStream`): a ring
    buffer of the episode's last ``capacity`` steps. All zeros is an empty store.

    :param keys: ``[B, capacity, d_model]``.
    :param values: ``[B, capacity, d_model]``.
    :param filled: ``[B, capacity]`` 1.0 where a slot holds an entry of this episode.
    :param pointer: ``[B]`` the slot the next step writes (steps since the episode start,
        modulo ``capacity``; a float holding an integer).
    """

    keys: Tensor
    values: Tensor
    filled: Tensor
    pointer: Tensor


StreamState = tuple[Mamba2State, ...] | ClockedStreamState | EpisodicState
"""One stream's state: per-layer Mamba-2 states (clock 1, the default, as before), a clocked
Mamba stream's, or an episodic stream's."""


class ThalamusState(NamedTuple):
    """Everything :class:`~thalamus_rl.DistributedMamba` carries from one step to the next.

    Every leaf is a tensor whose first dimension is the batch (one row per env), so the
    whole state can be indexed by env, masked by episode starts, detached, concatenated
    and flattened with the methods below, whatever the number of streams, layers or
    iterations.

    :param mamba: ``mamba[i][m]`` is the :data:`StreamState` of stream ``m`` in feedback
        iteration ``i``: for a Mamba stream with clock 1 (the default), ``mamba[i][m][l]``
        is the :class:`Mamba2State` of its layer ``l``.
    :param prev_workspace: ``[B, I - 1, d_workspace]``: for iteration ``i + 1``, the
        workspace that iteration ``i`` produced at the previous step (``w^(i)_{t-1}``).
    :param prev_weights: ``[B, I - 1, M]``: iteration ``i``'s stream weights ``α^(i)_{t-1}``.
    :param fatigue: ``[B, I - 1, M]``: iteration ``i + 1``'s fatigue used at the previous step.
    """

    mamba: tuple[tuple[StreamState, ...], ...]
    prev_workspace: Tensor
    prev_weights: Tensor
    fatigue: Tensor

    @property
    def batch_size(self) -> int:
        return self.prev_workspace.shape[0]

    def map(self, fn) -> ThalamusState:
        """Apply ``fn`` to every tensor leaf and rebuild the same structure."""
        return pytree.tree_map(fn, self)

    def detach(self) -> ThalamusState:
        """The same state cut from the autograd graph."""
        return self.map(lambda t: t.detach())

    def to(self, device: torch.device | str) -> ThalamusState:
        return self.map(lambda t: t.to(device))

    def clone(self) -> ThalamusState:
        return self.map(lambda t: t.clone())

    def index(self, idx: Tensor | slice | int) -> ThalamusState:
        """The state of the envs selected by ``idx`` along the batch (an int keeps the dim)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return self.map(lambda t: t[idx])

    def mask(self, episode_starts: Tensor) -> ThalamusState:
        """Zero the state of envs whose observation starts an episode.

        :param episode_starts: ``[B]`` bool (or 0/1).
        """
        keep = ~episode_starts.to(torch.bool)

        def _mask(t: Tensor) -> Tensor:
            return t * keep.view(-1, *([1] * (t.ndim - 1))).to(t.dtype)

        return self.map(_mask)

    @staticmethod
    def cat(states: list[ThalamusState]) -> ThalamusState:
        """Concatenate states along the batch."""
        leaves = [pytree.tree_flatten(s)[0] for s in states]
        spec = pytree.tree_flatten(states[0])[1]
        return pytree.tree_unflatten(
            [torch.cat(ts, dim=0) for ts in zip(*leaves, strict=True)], spec
        )

    def flatten(self) -> Tensor:
        """All leaves as one ``[B, S]`` tensor (for storage); :meth:`unflatten` inverts it."""
        leaves = pytree.tree_flatten(self)[0]
        return torch.cat([t.reshape(t.shape[0], -1) for t in leaves], dim=1)

    def unflatten(self, flat: Tensor) -> ThalamusState:
        """Rebuild a state shaped like ``self`` (any batch size) from :meth:`flatten`'s output.

        :param flat: ``[B', S]``.
        """
        leaves, spec = pytree.tree_flatten(self)
        sizes = [t[0].numel() for t in leaves]
        if flat.ndim != 2 or flat.shape[1] != sum(sizes):
            raise ValueError(
                f"flat state must have shape [B, {sum(sizes)}] for this structure, "
                f"got {tuple(flat.shape)}"
            )
        parts = torch.split(flat, sizes, dim=1)
        out = [p.reshape(flat.shape[0], *t.shape[1:]) for p, t in zip(parts, leaves, strict=True)]
        return pytree.tree_unflatten(out, spec)
