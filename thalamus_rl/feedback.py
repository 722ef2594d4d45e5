"""The reward-feedback pathway of the PhaseGate.

The :class:`FeedbackLayer` reads the reward signals carried by an observation (previous
reward, return so far, return of the previous episode in a trial, ...) and turns them into
a modulation of the gate's salience: a multiplicative and an additive change of the task
query, and a direction in token space whose dot product with each token is that token's
salience bias. Everything is per time step and accepts any leading batch dims ``*``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn


def symlog(x: Tensor) -> Tensor:
    """Symmetric log squashing, ``sign(x) * log(1 + |x|)``.

    Identity-like near zero, logarithmic for large magnitudes, so unbounded returns of any
    scale reach the network as O(1)-O(10) numbers.

    :param x: any shape.
    :return: same shape as ``x``.

    >>> symlog(torch.tensor([-(math.e - 1.0), 0.0, 1e6])).round(decimals=3)
    tensor([-1.0000,  0.0000, 13.8160])
    """
    return torch.sign(x) * torch.log1p(torch.abs(x))


class FeedbackModulation(NamedTuple):
    """What the feedback pathway contributes to the gate (per step).

    :ivar query_scale: ``[*, d_model]`` multiplies the task query; ``1 + gain * (...)``,
        so close to 1 at initialisation.
    :ivar query_shift: ``[*, d_model]`` added to the task query after scaling.
    :ivar bias_direction: ``[*, d_model]`` token j's salience bias is
        ``b_j = bias_direction . x_j`` (O(N d) for N tokens).
    """

    query_scale: Tensor
    query_shift: Tensor
    bias_direction: Tensor


class FeedbackLayer(nn.Module):
    """Reward signals -> query modulation and per-token salience bias of the gate.

    ``symlog(signals) -> Linear -> tanh -> Linear -> (a, c, v)`` and, with a learnable
    positive scalar ``gain``, ``query_scale = 1 + gain * a``, ``query_shift = gain * c``,
    ``bias_direction = gain * v``. The gain starts at ``init_gain`` (small, not zero), so the
    modulation starts close to the identity while every parameter, the gain included, gets
    gradient from the first update. The tanh bounds the modulation for any signal value,
    so one extreme return cannot swamp the task query.

    :param n_signals: number of raw reward signals per step.
    :param d_model: token / query width.
    :param hidden: width of the hidden layer.
    :param init_gain: initial value of ``gain`` (> 0).

    >>> layer = FeedbackLayer(n_signals=3, d_model=8)
    >>> mod = layer(torch.tensor([[0.0, 1.5, -20.0]]))
    >>> [tuple(t.shape) for t in mod]
    [(1, 8), (1, 8), (1, 8)]
    >>> round(layer.gain.item(), 3)
    0.1
    """

    def __init__(self, n_signals: int, d_model: int, hidden: int = 32, init_gain: float = 0.1):
        super().__init__()
        for name, value in (("n_signals", n_signals), ("d_model", d_model), ("hidden", hidden)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FeedbackLayer: {name} must be a positive int, got {value!r}.")
        if not init_gain > 0.0:
            raise ValueError(
                f"FeedbackLayer: init_gain must be > 0 so that the pathway gets gradient "
                f"from the first step, got {init_gain!r}."
            )
        self.n_signals = n_signals
        self.d_model = d_model
        self.hidden = hidden
        self.fc_in = nn.Linear(n_signals, hidden)
        self.act = nn.Tanh()
        self.fc_out = nn.Linear(hidden, 3 * d_model)
        self.log_gain = nn.Parameter(torch.tensor(math.log(init_gain)))

    @property
    def gain(self) -> Tensor:
        """Scalar gain (> 0) of the feedback pathway; logged as ``feedback_gain``."""
        return self.log_gain.exp()

    def forward(self, signals: Tensor) -> FeedbackModulation:
        """Compute the modulation for one step.

        :param signals: ``[*, n_signals]`` raw (unbounded) reward signals.
        :return: :class:`FeedbackModulation`, each field ``[*, d_model]``.
        """
        if signals.dim() < 1 or signals.shape[-1] != self.n_signals:
            raise ValueError(
                f"FeedbackLayer: signals must have shape [*, n_signals={self.n_signals}], "
                f"got {tuple(signals.shape)}."
            )
        h = self.act(self.fc_in(symlog(signals)))
        a, c, v = (self.gain * self.fc_out(h)).chunk(3, dim=-1)
        return FeedbackModulation(query_scale=1.0 + a, query_shift=c, bias_direction=v)

    def extra_repr(self) -> str:
        return f"n_signals={self.n_signals}, d_model={self.d_model}, hidden={self.hidden}"
