"""PhaseWorkspace: pre-LN self-attention over the K gated tokens, biased by phase similarity.

Attention logits of head h between kept tokens i and j are

    QK^T / sqrt(d_h) + lambda_h * (1/P) tag_i . tag_j

where ``(1/P) tag_i . tag_j`` is the mean cosine of the phase-angle differences of the two
tokens (see :mod:`thalamus_rl.gate`) and ``lambda_h = softplus(rho_h) >= 0`` is learnable,
shared by all layers. Tokens in phase attend to each other more; lambda = 0 is plain
attention. No dropout anywhere: the policy's log-probabilities must be the same at
rollout and at update.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# PyTorch's memory-efficient attention backward (CUDA; torch 2.11 on an H100) fails for a
# float mask that needs a gradient once the batch reaches 65536 ("The size of tensor a (65536)
# must match the size of tensor b (65535)", a grid-size limit). Larger batches (a GPU minibatch
# of 64 envs x 1024 steps) run in slices of at most this many rows: the same function.
SDPA_MAX_BATCH = 65535

# On CPU under autograd, PhaseAttentionBlock.forward computes the attention as an explicit
# softmax instead of calling SDPA (see there); False restores SDPA everywhere (tests compare).
EXPLICIT_CPU_ATTENTION = True


def batched_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor) -> Tensor:
    """``F.scaled_dot_product_attention`` over ``[B, H, L, d_h]`` in batch slices of at most
    :data:`SDPA_MAX_BATCH` rows (one call when ``B`` is smaller). ``attn_mask`` has batch
    ``B`` or 1."""
    batch = q.shape[0]
    if batch <= SDPA_MAX_BATCH:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    per_row = attn_mask.shape[0] == batch
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                q[i : i + SDPA_MAX_BATCH],
                k[i : i + SDPA_MAX_BATCH],
                v[i : i + SDPA_MAX_BATCH],
                attn_mask=attn_mask[i : i + SDPA_MAX_BATCH] if per_row else attn_mask,
            )
            for i in range(0, batch, SDPA_MAX_BATCH)
        ]
    )


class PhaseAttentionBlock(nn.Module):
    """One pre-LN transformer layer: ``x + Attn(LN(x)); x + MLP(LN(x))``.

    :param d_model: token width ``d``.
    :param n_heads: attention heads; ``d`` must be divisible by it.
    :param d_hidden: MLP hidden width.
    """

    def __init__(self, d_model: int, n_heads: int, d_hidden: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        # d_hidden = 0: attention only (the MLP is half the layer's FLOPs at K tokens).
        self.mlp = (
            nn.Sequential(
                nn.LayerNorm(d_model),
                nn.Linear(d_model, d_hidden),
                nn.GELU(),
                nn.Linear(d_hidden, d_model),
            )
            if d_hidden > 0
            else None
        )

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``[B, K, d] -> 3 x [B, H, K, d_h]`` from the normalised input."""
        qkv = self.qkv(self.norm1(x)).unflatten(-1, (3, self.n_heads, self.d_head))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, H, K, d_h]
        return q, k, v

    def _finish(self, x: Tensor, attended: Tensor) -> Tensor:
        """Residual + MLP given ``attended: [B, H, K, d_h]``."""
        x = x + self.out_proj(attended.transpose(1, 2).flatten(-2))
        return x if self.mlp is None else x + self.mlp(x)

    def forward(self, x: Tensor, attn_bias: Tensor) -> Tensor:
        """Fast path: ``scaled_dot_product_attention``, or on CPU under autograd the explicit
        softmax of :meth:`forward_explicit` without the maps.

        On CPU a float mask that needs a gradient sends SDPA to its unfused math path anyway
        (the same ops plus checks and copies); the explicit form computes the same numbers
        (bit-identical on torch 2.13) with a cheaper backward (``docs/benchmarks/profile.md``,
        "Eager changes, issue 34b"). Without autograd (rollouts) SDPA's fused CPU kernel is the
        faster one and stays.

        :param x: ``[B, K, d]``.
        :param attn_bias: ``[B, H, K, K]`` additive logit bias (phase term, -inf at masked keys).
        :return: ``[B, K, d]``.
        """
        q, k, v = self._qkv(x)
        if EXPLICIT_CPU_ATTENTION and x.device.type == "cpu" and torch.is_grad_enabled():
            logits = torch.baddbmm(
                attn_bias.flatten(0, 1),
                q.flatten(0, 1),
                k.flatten(0, 1).transpose(-1, -2),
                alpha=1.0 / math.sqrt(self.d_head),
            )
            probs = torch.softmax(logits, dim=-1).view_as(attn_bias)
            return self._finish(x, probs @ v)
        return self._finish(x, batched_sdpa(q, k, v, attn_bias))

    def forward_explicit(self, x: Tensor, attn_bias: Tensor) -> tuple[Tensor, Tensor]:
        """Reference path with an explicit softmax; also returns the attention probabilities.

        :param x: ``[B, K, d]``.
        :param attn_bias: ``[B, H, K, K]``.
        :return: ``y: [B, K, d]`` and ``probs: [B, H, K, K]`` (rows: queries).
        """
        q, k, v = self._qkv(x)
        logits = q @ k.transpose(-1, -2) / math.sqrt(self.d_head) + attn_bias
        probs = torch.softmax(logits, dim=-1)
        return self._finish(x, probs @ v), probs


class PhaseWorkspace(nn.Module):
    """Phase-biased self-attention over the kept tokens (the Synthetic Thalamus' workspace).

    The residual stream is returned without a final LayerNorm, so the gate weights that
    scale the kept tokens set the mix of each token with its attention update (the pre-LN
    inputs of the attention itself do not see them, and a reader that LayerNorms each
    token sees only that mix: see ``ThalamusConfig.readout_salience_bias``). Slots where
    ``mask`` is False are ignored as keys and come out as zeros.

    :param d_model: token width ``d``; divisible by ``n_heads``.
    :param n_heads: attention heads (one phase scale ``lambda_h`` each).
    :param n_layers: number of pre-LN layers (they share ``lambda``).
    :param phase_dim: ``P``; phase tags have ``2P`` entries.
    :param mlp_ratio: MLP hidden width = ``round(mlp_ratio * d_model)``; 0 = no MLP.
    :param init_phase_scale: initial ``lambda_h`` (> 0).

    >>> ws = PhaseWorkspace(d_model=16, n_heads=4, phase_dim=3)
    >>> tokens, phase = torch.randn(2, 5, 16), torch.randn(2, 5, 6)
    >>> mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    >>> y = ws(tokens, phase, mask)
    >>> tuple(y.shape), bool(y[1, 2:].eq(0).all())
    ((2, 5, 16), True)
    >>> ws.phase_scale.shape
    torch.Size([4])
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int = 4,
        n_layers: int = 1,
        phase_dim: int = 8,
        mlp_ratio: float = 2.0,
        init_phase_scale: float = 1.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("n_heads", n_heads),
            ("n_layers", n_layers),
            ("phase_dim", phase_dim),
        ):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PhaseWorkspace: {name} must be a positive int, got {value!r}.")
        if d_model % n_heads != 0:
            raise ValueError(
                f"PhaseWorkspace: d_model={d_model} must be divisible by n_heads={n_heads}; "
                f"choose n_heads among the divisors of d_model."
            )
        if mlp_ratio < 0:
            raise ValueError(
                f"PhaseWorkspace: mlp_ratio must be >= 0 (0 = no MLP), got {mlp_ratio!r}."
            )
        d_hidden = round(mlp_ratio * d_model)
        if not init_phase_scale > 0.0:
            raise ValueError(
                f"PhaseWorkspace: init_phase_scale must be > 0 (softplus range), got "
                f"{init_phase_scale!r}."
            )
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.phase_dim = phase_dim
        self.d_hidden = d_hidden
        self.layers = nn.ModuleList(
            PhaseAttentionBlock(d_model, n_heads, d_hidden) for _ in range(n_layers)
        )
        rho = math.log(math.expm1(init_phase_scale))  # softplus^-1
        self.phase_scale_raw = nn.Parameter(torch.full((n_heads,), rho))

    @property
    def phase_scale(self) -> Tensor:
        """``[n_heads]`` phase-similarity scales ``lambda_h = softplus(rho_h) >= 0``."""
        return F.softplus(self.phase_scale_raw)

    def _prepare(
        self, tokens: Tensor, phase: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate, flatten leading dims and build the additive bias ``[B, H, K, K]``."""
        if tokens.dim() < 2 or tokens.shape[-1] != self.d_model:
            raise ValueError(
                f"PhaseWorkspace: tokens must have shape [*, K, d_model={self.d_model}], "
                f"got {tuple(tokens.shape)}."
            )
        lead, k = tokens.shape[:-2], tokens.shape[-2]
        if phase.shape != (*lead, k, 2 * self.phase_dim):
            raise ValueError(
                f"PhaseWorkspace: phase must have shape [*, K, 2*phase_dim] = "
                f"{(*lead, k, 2 * self.phase_dim)}, got {tuple(phase.shape)}."
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != (*lead, k)):
            raise ValueError(
                f"PhaseWorkspace: mask must be a bool tensor of shape [*, K] = {(*lead, k)} "
                f"(True = valid), got {mask.dtype} {tuple(mask.shape)}."
            )
        x = tokens.reshape(-1, k, self.d_model)
        tag = phase.reshape(-1, k, 2 * self.phase_dim).to(x.dtype)
        sim = tag @ tag.transpose(-1, -2) * (1.0 / self.phase_dim)  # mean cos, [B, K, K]
        bias = self.phase_scale.to(x.dtype)[:, None, None] * sim.unsqueeze(1)  # [B, H, K, K]
        m = None
        if mask is not None:
            m = mask.reshape(-1, k)
            # Rows without any valid slot keep all keys, so nothing divides by zero; their
            # outputs are zeroed at the end anyway.
            keys = m | ~m.any(-1, keepdim=True)
            bias = bias.masked_fill(~keys[:, None, None, :], float("-inf"))
        return x, bias, m

    def forward(self, tokens: Tensor, phase: Tensor, mask: Tensor | None = None) -> Tensor:
        """Refine the kept tokens.

        :param tokens: ``[*, K, d]`` (``GateOutput.tokens``).
        :param phase: ``[*, K, 2P]`` phase tags (``GateOutput.phase``).
        :param mask: ``[*, K]`` bool, True = valid slot (``GateOutput.kept_mask``); None = all.
        :return: ``[*, K, d]``, zeros at invalid slots.
        """
        x, bias, m = self._prepare(tokens, phase, mask)
        for layer in self.layers:
            x = layer(x, bias)
        if m is not None:
            x = x.masked_fill(~m.unsqueeze(-1), 0.0)
        return x.reshape(tokens.shape)

    def attention_probs(
        self, tokens: Tensor, phase: Tensor, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Explicit-softmax reference of :meth:`forward`, with the attention maps.

        For tests and visualisation; same function as ``forward`` up to float rounding.

        :return: ``y: [*, K, d]`` and ``probs: [*, n_layers, H, K, K]`` (query rows).
        """
        x, bias, m = self._prepare(tokens, phase, mask)
        maps = []
        for layer in self.layers:
            x, p = layer.forward_explicit(x, bias)
            maps.append(p)
        if m is not None:
            x = x.masked_fill(~m.unsqueeze(-1), 0.0)
        lead, k = tokens.shape[:-2], tokens.shape[-2]
        probs = torch.stack(maps, dim=1).reshape(*lead, self.n_layers, self.n_heads, k, k)
        return x.reshape(tokens.shape), probs

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, n_layers={self.n_layers}, "
            f"phase_dim={self.phase_dim}, d_hidden={self.d_hidden}"
        )
