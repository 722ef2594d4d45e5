"""PhaseGate: task- and reward-conditioned top-K selection of observation tokens.

Per time step, for N tokens ``x_j`` (width d) the gate computes a salience logit

    s_j = sum_h q_h . (W_k,h x_j) / sqrt(d_h) + b_j

where the query ``q`` comes from the task vector (modulated by the reward feedback) and
``b_j = bias_direction . x_j`` is the feedback's per-token bias. Because every head has the
same width, the sum over heads is ``x_j . (W_k^T q) / sqrt(d_h)``: the query is projected
back through ``W_k`` once (O(d^2) per step) and dotted with every token (O(N d)), instead
of projecting every token to a key (O(N d^2)). :func:`salience_reference` is the naive
per-head form, kept as the reference the fast path is tested against.

The K most salient valid tokens are kept, ordered by salience, and multiplied by a weight
``K_valid * softmax(s over the kept set)`` (mean 1 over the kept slots), so a loss on the
gate's output tokens reaches the scorer. Each kept token also gets a phase tag
``(cos theta, sin theta)`` with ``theta = W_theta x_j + Omega pos_j`` (learned content
projection and learned 2-D frequencies), so ``(1/P) tag_i . tag_j`` is the mean cosine of
the angle differences: a rotary-like similarity that the PhaseWorkspace uses as an
attention bias.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from thalamus_rl.feedback import FeedbackLayer
from thalamus_rl.film import FiLM


class GateOutput(NamedTuple):
    """Result of one :class:`PhaseGate` call (``K = top_k``, or N when the gate is off).

    :ivar tokens: ``[*, K, d]`` kept tokens, each multiplied by its gate weight (zeros in
        slots that hold no valid token).
    :ivar phase: ``[*, K, 2P]`` phase tags ``(cos theta, sin theta)`` of the kept tokens.
    :ivar indices: ``[*, K]`` long, indices into N of the kept tokens, by salience (desc).
    :ivar weights: ``[*, K]`` gate weights (0 for slots that hold no valid token).
    :ivar kept_mask: ``[*, K]`` bool, False where K exceeds the number of valid tokens.
    :ivar salience: ``[*, N]`` salience logits, ``-inf`` at masked tokens.
    :ivar query: ``[*, d]`` the task/feedback-conditioned query.
    :ivar rest: ``[*, d]`` the tokens the gate dropped, summed with their salience
        probabilities ``softmax(s)_j`` over all valid tokens (zeros when the gate is off or
        keeps every valid token). It carries the dropped tokens' probability mass, so the
        scorer gets gradient from every token, not only the kept ones: a dropped token that
        would help rises in salience until it enters the top K.
    """

    tokens: Tensor
    phase: Tensor
    indices: Tensor
    weights: Tensor
    kept_mask: Tensor
    salience: Tensor
    query: Tensor
    rest: Tensor


def salience_reference(
    tokens: Tensor,
    query: Tensor,
    key_weight: Tensor,
    n_heads: int,
    bias_direction: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Naive salience that materialises every per-head key (O(N d^2)); the test reference.

    :param tokens: ``[*, N, d]``.
    :param query: ``[*, d]`` conditioned query (``GateOutput.query``).
    :param key_weight: ``[d, d]`` weight of ``W_k`` (``nn.Linear`` layout, out x in).
    :param n_heads: number of heads ``H``; ``d_h = d / H``.
    :param bias_direction: ``[*, d]`` or None (no per-token bias).
    :param mask: ``[*, N]`` bool (True = valid) or None.
    :return: ``[*, N]`` salience logits, ``-inf`` at masked tokens.
    """
    d = tokens.shape[-1]
    d_head = d // n_heads
    keys = (tokens @ key_weight.T).unflatten(-1, (n_heads, d_head))  # [*, N, H, d_h]
    q = query.unflatten(-1, (n_heads, d_head)).unsqueeze(-3)  # [*, 1, H, d_h]
    s = (keys * q).sum(-1).sum(-1) / math.sqrt(d_head)  # [*, N]
    if bias_direction is not None:
        s = s + (tokens * bias_direction.unsqueeze(-2)).sum(-1)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def _check_finite(name: str, x: Tensor) -> None:
    # A NaN or inf anywhere makes the sum non-finite: one reduction instead of an
    # element-wise isfinite plus all() (this runs on every rollout step and minibatch).
    if not bool(torch.isfinite(x.detach().sum())):
        raise ValueError(
            f"PhaseGate: {name} contains NaN or inf values; check the tokenizer / the "
            f"observation that produced it."
        )


class PhaseGate(nn.Module):
    """Top-K salience gate with phase tags (the Synthetic Thalamus' relay).

    :param d_model: token width ``d``; must be divisible by ``n_heads``.
    :param d_task: width of the task vector.
    :param n_heads: salience heads (sets ``d_h = d / n_heads``).
    :param top_k: number of tokens kept (``K``).
    :param phase_dim: number of phase angles ``P`` per token (tags have ``2P`` entries).
    :param n_feedback_signals: number of raw reward signals fed to the FeedbackLayer.
    :param use_feedback: build and use the :class:`FeedbackLayer`; False (ablation) leaves
        ``feedback_layer = None`` and ignores the ``feedback`` argument.
    :param enabled: False (ablation) turns the selection off: all N tokens are returned in
        their original order with weight 1 (0 at masked tokens), so K = N.
    :param film_query: modulate the (feedback-conditioned) query by a :class:`FiLM` of the
        task vector, ``q * (1 + gamma(task)) + beta(task)`` (identity at initialisation), so
        the task scales each channel of what the gate looks for, not only adds to it.

    >>> gate = PhaseGate(d_model=16, d_task=8, top_k=4, phase_dim=3)
    >>> out = gate(torch.randn(2, 10, 16), torch.randn(2, 8), feedback=torch.zeros(2, 3))
    >>> tuple(out.tokens.shape), tuple(out.phase.shape), tuple(out.indices.shape)
    ((2, 4, 16), (2, 4, 6), (2, 4))
    >>> bool((out.salience.gather(-1, out.indices).diff(dim=-1) <= 0).all())  # by salience
    True
    >>> round(out.weights.sum(-1).mean().item(), 4)  # weights average 1 over kept slots
    4.0
    """

    def __init__(
        self,
        d_model: int,
        d_task: int,
        n_heads: int = 4,
        top_k: int = 16,
        phase_dim: int = 8,
        n_feedback_signals: int = 3,
        use_feedback: bool = True,
        enabled: bool = True,
        film_query: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_task", d_task),
            ("n_heads", n_heads),
            ("top_k", top_k),
            ("phase_dim", phase_dim),
            ("n_feedback_signals", n_feedback_signals),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PhaseGate: {name} must be a positive int, got {value!r}.")
        if d_model % n_heads != 0:
            raise ValueError(
                f"PhaseGate: d_model={d_model} must be divisible by n_heads={n_heads}; "
                f"choose n_heads among the divisors of d_model."
            )
        self.d_model = d_model
        self.d_task = d_task
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.top_k = top_k
        self.phase_dim = phase_dim
        self.n_feedback_signals = n_feedback_signals
        self.use_feedback = use_feedback
        self.enabled = enabled

        self.query_proj = nn.Linear(d_task, d_model)
        self.key_proj = nn.Linear(d_model, d_model, bias=False)  # W_k, never applied to tokens
        self.feedback_layer: FeedbackLayer | None = (
            FeedbackLayer(n_feedback_signals, d_model) if use_feedback else None
        )
        self.query_film: FiLM | None = FiLM(d_task, d_model) if film_query else None
        self.phase_proj = nn.Linear(d_model, phase_dim)
        # Learned 2-D frequencies Omega [P, 2]: random directions, magnitudes spread
        # geometrically over a decade (1 to 0.1 rad per position unit), like 2-D RoPE.
        angle = torch.rand(phase_dim) * 2.0 * math.pi
        radius = torch.logspace(0.0, -1.0, phase_dim)
        self.phase_freq = nn.Parameter(
            torch.stack((angle.cos(), angle.sin()), -1) * radius[:, None]
        )

    # ------------------------------------------------------------------ helpers
    def conditioned_query(
        self, task: Tensor, feedback: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The query ``q`` and the per-token bias direction of one step.

        :param task: ``[*, d_task]``.
        :param feedback: ``[*, n_feedback_signals]`` or None (only when feedback is off).
        :return: ``q: [*, d]`` and ``bias_direction: [*, d]`` (None when feedback is off).
        """
        q = self.query_proj(task)
        if self.feedback_layer is None:
            return self._film_query(q, task), None
        if feedback is None:
            raise ValueError(
                "PhaseGate: use_feedback=True but feedback=None; pass the reward signals "
                f"[*, {self.n_feedback_signals}] or build the gate with use_feedback=False."
            )
        mod = self.feedback_layer(feedback)
        q = q * mod.query_scale + mod.query_shift
        return self._film_query(q, task), mod.bias_direction

    def _film_query(self, q: Tensor, task: Tensor) -> Tensor:
        """``q`` modulated by the task's FiLM (``film_query``), else ``q`` unchanged."""
        if self.query_film is None:
            return q
        return self.query_film(q.reshape(-1, self.d_model), task.reshape(-1, self.d_task)).view(
            q.shape
        )

    def salience(
        self, tokens: Tensor, query: Tensor, bias_direction: Tensor | None, mask: Tensor | None
    ) -> Tensor:
        """Salience logits in O(N d): ``s_j = x_j . (W_k^T q / sqrt(d_h) + bias_direction)``.

        :param tokens: ``[*, N, d]``.
        :param query: ``[*, d]``.
        :param bias_direction: ``[*, d]`` or None.
        :param mask: ``[*, N]`` bool (True = valid) or None.
        :return: ``[*, N]``, ``-inf`` at masked tokens.
        """
        u = (query @ self.key_proj.weight) * (1.0 / math.sqrt(self.d_head))  # W_k^T q: [*, d]
        if bias_direction is not None:
            u = u + bias_direction
        # Multiply-and-sum rather than a batched mat-vec: on CPU the backward of ``x @ u`` is a
        # batched outer product through bmm, several times slower than this elementwise form.
        s = (tokens * u.unsqueeze(-2)).sum(-1)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return s

    def phase_angles(self, tokens: Tensor, positions: Tensor | None) -> Tensor:
        """Phase angles ``theta = W_theta x + Omega pos``.

        :param tokens: ``[*, N, d]``.
        :param positions: ``[*, N, 2]`` or None (zeros).
        :return: ``[*, N, P]``.
        """
        theta = self.phase_proj(tokens)
        if positions is not None:
            theta = theta + positions @ self.phase_freq.T
        return theta

    @staticmethod
    def phase_tags(theta: Tensor) -> Tensor:
        """``(cos theta, sin theta)`` concatenated: ``[*, N, P] -> [*, N, 2P]``."""
        return torch.cat((theta.cos(), theta.sin()), dim=-1)

    @staticmethod
    def entropy(salience: Tensor, mask: Tensor | None = None) -> Tensor:
        """Entropy (nats) of ``softmax(salience)`` over the valid tokens.

        :param salience: ``[*, N]`` logits (``-inf`` at masked tokens is allowed).
        :param mask: ``[*, N]`` bool (True = valid) or None (valid = finite logits).
        :return: ``[*]``; ``log(N_valid)`` for equal logits, 0 for one valid token.
        """
        valid = salience > float("-inf") if mask is None else mask
        s = salience.masked_fill(~valid, float("-inf"))
        log_p = torch.log_softmax(s, dim=-1)
        return -torch.where(valid, log_p.exp() * log_p, 0.0).sum(-1)

    def _validate(
        self,
        tokens: Tensor,
        task: Tensor,
        feedback: Tensor | None,
        mask: Tensor | None,
        positions: Tensor | None,
    ) -> None:
        if tokens.dim() < 2 or tokens.shape[-1] != self.d_model or tokens.shape[-2] == 0:
            raise ValueError(
                f"PhaseGate: tokens must have shape [*, N>0, d_model={self.d_model}], "
                f"got {tuple(tokens.shape)}."
            )
        lead = tokens.shape[:-2]
        n = tokens.shape[-2]
        if task.shape != (*lead, self.d_task):
            raise ValueError(
                f"PhaseGate: task must have shape [*, d_task] = {(*lead, self.d_task)} "
                f"(leading dims of tokens {tuple(tokens.shape)}), got {tuple(task.shape)}."
            )
        if feedback is not None and feedback.shape != (*lead, self.n_feedback_signals):
            raise ValueError(
                f"PhaseGate: feedback must have shape [*, n_feedback_signals] = "
                f"{(*lead, self.n_feedback_signals)}, got {tuple(feedback.shape)}."
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (*lead, n)):
            raise ValueError(
                f"PhaseGate: mask must be a bool tensor of shape [*, N] = {(*lead, n)} "
                f"(True = valid), got {mask.dtype} {tuple(mask.shape)}."
            )
        if positions is not None and positions.shape != (*lead, n, 2):
            raise ValueError(
                f"PhaseGate: positions must have shape [*, N, 2] = {(*lead, n, 2)}, "
                f"got {tuple(positions.shape)}."
            )
        checked = [("tokens", tokens), ("task", task)]
        if feedback is not None and self.feedback_layer is not None:
            checked.append(("feedback", feedback))
        if positions is not None:
            checked.append(("positions", positions))
        # One host sync for every check (this runs on every rollout step and minibatch): a NaN
        # or inf anywhere makes the total non-finite, and a row without a valid token makes
        # ``mask.any(-1).all()`` False. Only on failure do the checks run one by one.
        total = sum(x.detach().sum() for _, x in checked)
        ok = torch.isfinite(total)
        if mask is not None:
            ok = ok & mask.any(-1).all()
        if bool(ok):
            return
        for name, x in checked:
            _check_finite(name, x)
        if mask is not None and not bool(mask.any(-1).all()):
            bad = (~mask.any(-1)).nonzero()[0].tolist()
            raise ValueError(
                f"PhaseGate: batch row {bad} has no valid token (mask is all False); every "
                f"step needs at least one valid token to select from."
            )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tokens: Tensor,
        task: Tensor,
        feedback: Tensor | None = None,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> GateOutput:
        """Select, weight and phase-tag the K most salient tokens of each step.

        :param tokens: ``[*, N, d]`` observation tokens.
        :param task: ``[*, d_task]`` task vector.
        :param feedback: ``[*, n_feedback_signals]`` raw reward signals (required when
            ``use_feedback``; ignored otherwise).
        :param mask: ``[*, N]`` bool, True = valid token; None = all valid.
        :param positions: ``[*, N, 2]`` float 2-D token positions; None = zeros.
        :return: :class:`GateOutput`.
        """
        self._validate(tokens, task, feedback, mask, positions)
        lead, n, d = tokens.shape[:-2], tokens.shape[-2], tokens.shape[-1]
        x = tokens.reshape(-1, n, d)  # [B, N, d]
        m = mask.reshape(-1, n) if mask is not None else None
        pos = positions.reshape(-1, n, 2) if positions is not None else None
        fb = feedback.reshape(-1, self.n_feedback_signals) if feedback is not None else None

        q, bias_dir = self.conditioned_query(task.reshape(-1, self.d_task), fb)
        s = self.salience(x, q, bias_dir, m)  # [B, N]
        b = x.shape[0]

        if not self.enabled:
            idx = torch.arange(n, device=x.device).expand(b, n)
            kept = m if m is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
            w = kept.to(x.dtype)
            x_kept, pos_kept = x, pos
            rest = x.new_zeros(b, d)
        else:
            k = self.top_k
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # ties: low idx
            idx = order[:, : min(k, n)]
            if k > n:
                idx = torch.cat((idx, idx.new_zeros(b, k - n)), dim=-1)
            n_valid = m.sum(-1, keepdim=True) if m is not None else torch.full_like(idx[:, :1], n)
            kept = torch.arange(k, device=x.device) < n_valid  # [B, K]
            s_kept = s.gather(-1, idx).masked_fill(~kept, float("-inf"))
            w = torch.softmax(s_kept, dim=-1) * kept.sum(-1, keepdim=True).to(x.dtype)
            x_kept = x.gather(1, idx.unsqueeze(-1).expand(b, k, d))
            # Probability mass of the dropped tokens: softmax over all valid tokens, zeroed
            # at the kept ones (a scatter of the kept slots into N).
            dropped = torch.ones_like(s, dtype=torch.bool).scatter(-1, idx[:, : min(k, n)], False)
            p_rest = torch.softmax(s, dim=-1).masked_fill(~dropped, 0.0)
            rest = (p_rest.unsqueeze(-1) * x).sum(-2)  # [B, d] (elementwise: see salience)
            pos_kept = pos.gather(1, idx.unsqueeze(-1).expand(b, k, 2)) if pos is not None else None

        phase = self.phase_tags(self.phase_angles(x_kept, pos_kept))
        kk = idx.shape[-1]
        return GateOutput(
            tokens=(x_kept * w.unsqueeze(-1)).reshape(*lead, kk, d),
            phase=phase.reshape(*lead, kk, 2 * self.phase_dim),
            indices=idx.reshape(*lead, kk),
            weights=w.reshape(*lead, kk),
            kept_mask=kept.reshape(*lead, kk),
            salience=s.reshape(*lead, n),
            query=q.reshape(*lead, d),
            rest=rest.reshape(*lead, d),
        )

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_task={self.d_task}, n_heads={self.n_heads}, "
            f"top_k={self.top_k}, phase_dim={self.phase_dim}, "
            f"use_feedback={self.use_feedback}, enabled={self.enabled}"
        )
