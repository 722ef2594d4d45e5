"""A Mamba-2 (SSD) block with exact episode resets, in pure PyTorch, with an optional kernel path.

:class:`Mamba2Block` has mamba-ssm's ``Mamba2`` constructor arguments that matter for RL
and exactly its parameter names and shapes (``in_proj``, ``conv1d``, ``dt_bias``,
``A_log``, ``D``, ``norm.weight``, ``out_proj``), so a ``state_dict`` moves between the two
with ``strict=True``. The pure-PyTorch path (:mod:`thalamus_rl.ssd`) is the reference and
runs anywhere; on CUDA with mamba-ssm and causal-conv1d installed, ``backend="kernel"``
runs the same weights through ``causal_conv1d_fn`` and ``mamba_chunk_scan_combined``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thalamus_rl.config import BACKENDS
from thalamus_rl.ssd import segment_ids, ssd_scan_chunked

__all__ = [
    "Mamba2Block",
    "Mamba2State",
    "RMSNormGated",
    "rms_norm",
    "rms_norm_each",
    "kernels_available",
    "use_kernel_path",
    "AUTO_KERNEL_MIN_ROWS",
    "BACKENDS",
    "blocks_fusable",
    "mamba2_forward_multi",
    "mamba2_step_multi",
]


# Rows (batch x time) from which backend="auto" takes the kernel path. On an H100
# (scripts/benchmark_kernels.py, docs/benchmarks/kernels.md) ThalamusCore's forward + backward
# ran 0.64-0.76x as fast on the kernels as on the pure path at PPO minibatches (8-64 envs x 128
# steps: launch-bound, and the kernels run the streams one by one where the pure path fuses
# them), 1.0x at 256 x 128 and 1.25x at 64 x 1024.
AUTO_KERNEL_MIN_ROWS = 32768


def use_kernel_path(backend: str, rows: int, on_cuda: bool) -> bool:
    """Whether a sequence of ``rows = B * T`` steps runs on the mamba-ssm kernels.

    ``"pure"``: never; ``"kernel"``: always (an error if they cannot run); ``"auto"``: on CUDA
    with the kernels installed, from :data:`AUTO_KERNEL_MIN_ROWS` rows on.
    """
    if backend == "pure":
        return False
    available = on_cuda and kernels_available()
    if backend == "kernel" and not available:
        reason = "the inputs are not on CUDA" if not on_cuda else kernel_unavailable_reason()
        raise RuntimeError(
            f"backend='kernel' needs CUDA inputs and the mamba-ssm + causal-conv1d kernels, but "
            f"{reason}; install them with `pip install -e .[cuda]` on a GPU machine, or use "
            "backend='pure'/'auto'"
        )
    return available and (backend == "kernel" or rows >= AUTO_KERNEL_MIN_ROWS)


@functools.cache
def kernel_unavailable_reason() -> str | None:
    """Why the mamba-ssm + causal-conv1d kernels cannot run here, or None when they can.

    Cached: a failed import is not retried on every forward.
    """
    if not torch.cuda.is_available():
        return "CUDA is not available"
    try:
        import causal_conv1d  # noqa: F401
        import mamba_ssm.ops.triton.ssd_combined  # noqa: F401
    except ImportError as err:  # mamba-ssm 2.2.x also fails here with transformers>=5
        return f"importing them failed: {type(err).__name__}: {err}"
    return None


def kernels_available() -> bool:
    """True when mamba-ssm's and causal-conv1d's CUDA kernels can be imported and CUDA is up."""
    return kernel_unavailable_reason() is None


class Mamba2State(NamedTuple):
    """Recurrent state of one :class:`Mamba2Block`, batch first.

    :param conv: ``[B, conv_dim, d_conv - 1]`` the last ``d_conv - 1`` inputs of the causal
        conv (oldest first), zeros where they belong to an earlier episode.
    :param ssm: ``[B, nheads, headdim, d_state]`` the SSD state.
    """

    conv: Tensor
    ssm: Tensor


def rms_norm(x: Tensor, eps: float, z: Tensor | None = None) -> Tensor:
    """``RMSNorm(x * silu(z))`` over the last dim, without a weight (``z=None``: no gate)."""
    if z is not None:
        x = x * F.silu(z)
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm_each(x: Tensor, norms: Sequence[RMSNormGated], z: Tensor | None = None) -> Tensor:
    """``M`` one-group norms at once: ``norms[m]`` on ``x[..., m, :]`` (``x, z: [..., M, d]``).

    The fused stream paths' form of ``[norms[m](x[..., m, :], z[..., m, :])]``; the norms must
    share ``eps`` and have a single group (:func:`blocks_fusable` checks the blocks' norms).
    """
    return rms_norm(x, norms[0].eps, z) * torch.stack([n.weight for n in norms])


class RMSNormGated(nn.Module):
    """``RMSNorm(x * silu(z)) * weight``, normalised per group (mamba-ssm's ``RMSNormGated``
    with ``norm_before_gate=False``).

    :param d: feature width.
    :param group_size: width of each normalisation group (``d`` = one group).
    """

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = group_size or d
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """:param x: ``[..., d]``; :param z: ``[..., d]`` gate or None. :return: ``[..., d]``."""
        groups = (*x.shape[:-1], -1, self.group_size)
        xg = rms_norm(x.reshape(groups), self.eps, None if z is None else z.reshape(groups))
        return xg.reshape(x.shape) * self.weight


class Mamba2Block(nn.Module):
    """Mamba-2 mixer: ``in_proj -> causal depthwise conv -> SSD scan -> gated RMSNorm -> out_proj``.

    Parameter names and shapes equal mamba-ssm's ``Mamba2`` (with ``rmsnorm=True``,
    ``norm_before_gate=False``, ``D_has_hdim=False``, ``bias=False``, ``conv_bias=True``,
    ``d_ssm=None``), so their state dicts are interchangeable.

    :param d_model: input and output width.
    :param d_state: SSM state size N per head.
    :param d_conv: causal conv kernel width.
    :param expand: ``d_inner = expand * d_model``.
    :param headdim: channels per head; ``nheads = d_inner // headdim``.
    :param ngroups: groups sharing B and C (``nheads`` must be divisible by it).
    :param A_init_range: ``A = -uniform(A_init_range)`` per head at init.
    :param dt_min: smallest initial step size.
    :param dt_max: largest initial step size (initial ``dt`` is log-uniform in between).
    :param dt_init_floor: lower clamp of the initial ``dt``.
    :param chunk_size: chunk length of the chunked scan.
    :param backend: ``"pure"`` (PyTorch), ``"kernel"`` (mamba-ssm, CUDA only) or ``"auto"``
        (kernel when the inputs are on CUDA, the kernels import and the sequence has at least
        :data:`AUTO_KERNEL_MIN_ROWS` steps in all, else pure: see :func:`use_kernel_path`).

    >>> block = Mamba2Block(d_model=16, d_state=8, headdim=8)
    >>> y, state = block(torch.randn(2, 5, 16))
    >>> y.shape, state.ssm.shape
    (torch.Size([2, 5, 16]), torch.Size([2, 4, 8, 8]))
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 32,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        chunk_size: int = 64,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.headdim = headdim
        self.ngroups = ngroups
        self.chunk_size = chunk_size
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(
                f"expand * d_model = {self.d_inner} must be divisible by headdim={headdim}; "
                f"choose headdim among the divisors of {self.d_inner}"
            )
        self.nheads = self.d_inner // headdim
        if self.nheads % ngroups:
            raise ValueError(f"nheads = {self.nheads} must be divisible by ngroups={ngroups}")
        if d_conv < 1:
            raise ValueError(f"d_conv must be >= 1, got {d_conv}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if not 0 < A_init_range[0] <= A_init_range[1]:
            raise ValueError(f"A_init_range must satisfy 0 < low <= high, got {A_init_range}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}")
        self.backend = _check_backend(backend)
        self.A_init_range = tuple(A_init_range)
        self.dt_range = (dt_min, dt_max)

        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        d_in_proj = 2 * self.d_inner + 2 * ngroups * d_state + self.nheads
        self.in_proj = nn.Linear(d_model, d_in_proj, bias=False)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            kernel_size=d_conv,
            groups=self.conv_dim,
            padding=d_conv - 1,
            bias=True,
        )
        # dt initialised log-uniformly in [dt_min, dt_max]; dt_bias = softplus^-1(dt).
        dt = torch.exp(
            torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]
        A = torch.empty(self.nheads).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.norm = RMSNormGated(self.d_inner, eps=1e-5, group_size=self.d_inner // ngroups)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    # ------------------------------------------------------------------ state
    def initial_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Mamba2State:
        """Zero state for ``batch_size`` sequences."""
        device = device if device is not None else self.A_log.device
        dtype = dtype or self.in_proj.weight.dtype
        return Mamba2State(
            conv=torch.zeros(
                batch_size, self.conv_dim, self.d_conv - 1, device=device, dtype=dtype
            ),
            ssm=torch.zeros(
                batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype
            ),
        )

    def half_lives(self) -> Tensor:
        """State half-life in steps of each head (``[nheads]``) for a zero ``dt`` input:
        ``ln 2 / (softplus(dt_bias) * exp(A_log))``."""
        with torch.no_grad():
            rate = F.softplus(self.dt_bias) * torch.exp(self.A_log)
            return math.log(2.0) / rate

    # ------------------------------------------------------------------ helpers
    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        return z, xBC, dt

    def _ssm_inputs(self, xBC: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Split the conv output into ``x [..., H, P]``, ``B``, ``C [..., G, N]``."""
        gn = self.ngroups * self.d_state
        x, B, C = torch.split(xBC, [self.d_inner, gn, gn], dim=-1)
        lead = x.shape[:-1]
        return (
            x.reshape(*lead, self.nheads, self.headdim),
            B.reshape(*lead, self.ngroups, self.d_state),
            C.reshape(*lead, self.ngroups, self.d_state),
        )

    def _use_kernel(self, x: Tensor) -> bool:
        """For ``x: [B, T, ...]`` (a sequence; steps always run the pure path)."""
        return use_kernel_path(self.backend, x.shape[0] * x.shape[1], x.is_cuda)

    def _check_input(self, x: Tensor, state: Mamba2State | None, ndim: int) -> None:
        if x.ndim != ndim or x.shape[-1] != self.d_model:
            want = "[B, T, d_model]" if ndim == 3 else "[B, d_model]"
            raise ValueError(
                f"Mamba2Block expects x of shape {want} with d_model={self.d_model}, "
                f"got {tuple(x.shape)}"
            )
        if state is not None and state.ssm.shape[0] != x.shape[0]:
            raise ValueError(
                f"state batch size {state.ssm.shape[0]} != input batch size {x.shape[0]}; "
                "pass initial_state(batch_size) or the state returned for this batch"
            )

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        state: Mamba2State | None = None,
        episode_starts: Tensor | None = None,
        n_valid: Tensor | None = None,
    ) -> tuple[Tensor, Mamba2State]:
        """Run a whole sequence.

        :param x: ``[B, T, d_model]``.
        :param state: state before step 0, or None (zeros).
        :param episode_starts: ``[B, T]`` bool, True where observation t starts an episode
            (the state is zeroed before t, in the conv and in the scan), or None.
        :param n_valid: ``[B]`` long, or None (all ``T`` steps are real): row ``b``'s steps
            from ``n_valid[b]`` on are padding that leaves the state as it is (``dt = 0`` in
            the scan, not in the conv state; their outputs are meaningless). Used by clocked
            streams (:class:`~thalamus_rl.distributed.MambaStream`); pure path only.
        :return: ``y [B, T, d_model]`` and the state after the last step.
        """
        self._check_input(x, state, 3)
        batch, length, _ = x.shape
        if episode_starts is not None and episode_starts.shape != (batch, length):
            raise ValueError(
                f"episode_starts must have shape [B, T] = {(batch, length)}, "
                f"got {tuple(episode_starts.shape)}"
            )
        if state is None:
            state = self.initial_state(batch, x.device, x.dtype)
        real = None
        if n_valid is not None:
            real = torch.arange(length, device=x.device) < n_valid[:, None]  # [B, T]
            if episode_starts is not None:  # padding starts nothing
                episode_starts = episode_starts.bool() & real
        z, xBC_raw, dt_raw = self._split(self.in_proj(x))
        seg = segment_ids(episode_starts, batch, length, x.device)
        if n_valid is None and self._use_kernel(x):
            y, ssm_state, xBC = self._scan_kernel(xBC_raw, dt_raw, state, seg)
        else:
            xBC = F.silu(
                causal_conv(xBC_raw, state.conv, seg, self.conv1d.weight[:, 0, :], self.conv1d.bias)
            )
            xs, B, C = self._ssm_inputs(xBC)
            A = -torch.exp(self.A_log)
            dt = F.softplus(dt_raw + self.dt_bias)  # [b, t, h]
            if real is not None:  # dt = 0 on padding: no decay and no input, the identity
                dt = dt * real.to(dt.dtype)[..., None]
            y, ssm_state = ssd_scan_chunked(
                xs * dt[..., None],
                dt * A,
                B,
                C,
                initial_state=state.ssm,
                resets=episode_starts,
                chunk_size=self.chunk_size,
            )
            y = y + xs * self.D[:, None]
            y = y.reshape(batch, length, self.d_inner)
        y = self.out_proj(self.norm(y, z))
        conv = final_conv_state(xBC_raw, state.conv, seg, n_valid)
        return y, Mamba2State(conv=conv, ssm=ssm_state)

    def _scan_kernel(
        self, xBC_raw: Tensor, dt_raw: Tensor, state: Mamba2State, seg: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """mamba-ssm kernel path: same function as the pure path (tested against it on CUDA).

        causal_conv1d_fn accepts ``seq_idx`` but not together with ``initial_states``, so the
        conv state is prepended as ``d_conv - 1`` extra positions of segment 0.
        """
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        batch, length, _ = xBC_raw.shape
        k = self.d_conv - 1
        seq_idx = seg.to(torch.int32)
        full = torch.cat([state.conv.transpose(1, 2).to(xBC_raw.dtype), xBC_raw], dim=1)
        seq_full = torch.cat([seq_idx.new_zeros(batch, k), seq_idx], dim=1).contiguous()
        # causal_conv1d wants channel-last memory for seq_idx: [b, c, t] view of [b, t, c].
        xBC = causal_conv1d_fn(
            full.transpose(1, 2),
            self.conv1d.weight[:, 0, :],
            self.conv1d.bias,
            seq_idx=seq_full,
            activation="silu",
        ).transpose(1, 2)[:, k:]
        xs, B, C = self._ssm_inputs(xBC)
        y, final = mamba_chunk_scan_combined(
            xs.contiguous(),
            dt_raw.contiguous(),
            -torch.exp(self.A_log.float()),
            B.contiguous(),
            C.contiguous(),
            chunk_size=self.chunk_size,
            D=self.D,
            z=None,
            dt_bias=self.dt_bias,
            dt_softplus=True,
            seq_idx=seq_idx.contiguous(),
            initial_states=state.ssm.contiguous(),
            return_final_states=True,
        )
        return y.reshape(batch, length, self.d_inner), final.to(xBC_raw.dtype), xBC

    # ------------------------------------------------------------------ step
    def step(
        self,
        x: Tensor,
        state: Mamba2State | None = None,
        episode_starts: Tensor | None = None,
    ) -> tuple[Tensor, Mamba2State]:
        """One time step (rollouts); ``step`` T times equals :meth:`forward` once.

        :param x: ``[B, d_model]``.
        :param state: state before this step, or None (zeros).
        :param episode_starts: ``[B]`` bool, True where this observation starts an episode.
        :return: ``y [B, d_model]`` and the new state.
        """
        self._check_input(x, state, 2)
        batch = x.shape[0]
        if state is None:
            state = self.initial_state(batch, x.device, x.dtype)
        conv_state, ssm_state = state
        if episode_starts is not None:
            keep = (~episode_starts.bool()).to(x.dtype)
            conv_state = conv_state * keep[:, None, None]
            ssm_state = ssm_state * keep[:, None, None, None]
        z, xBC_raw, dt_raw = self._split(self.in_proj(x))
        window = torch.cat([conv_state, xBC_raw[:, :, None]], dim=2)  # [b, c, d_conv]
        xBC = F.silu((window * self.conv1d.weight[:, 0, :]).sum(-1) + self.conv1d.bias)
        xs, B, C = self._ssm_inputs(xBC)  # [b, h, p], [b, g, n]
        # Heads of a group share B and C: broadcast over [b, g, h/g, ...] instead of copying.
        g, hg = self.ngroups, self.nheads // self.ngroups
        dt = F.softplus(dt_raw + self.dt_bias)  # [b, h]
        decay = torch.exp(dt * -torch.exp(self.A_log))
        dBx = (xs * dt[..., None]).view(batch, g, hg, self.headdim, 1) * B.view(
            batch, g, 1, 1, self.d_state
        )
        ssm_state = decay[:, :, None, None] * ssm_state + dBx.view_as(ssm_state)
        y = ssm_state.view(batch, g, hg * self.headdim, self.d_state) @ C.view(
            batch, g, self.d_state, 1
        )
        y = y.view(batch, self.nheads, self.headdim) + xs * self.D[:, None]
        y = self.out_proj(self.norm(y.reshape(batch, self.d_inner), z))
        return y, Mamba2State(conv=window[:, :, 1:], ssm=ssm_state)


def causal_conv(
    xBC: Tensor, conv_state: Tensor, seg: Tensor, weight: Tensor, bias: Tensor
) -> Tensor:
    """Depthwise causal conv over ``[state ; xBC]`` that sees no input from earlier episodes.

    :param xBC: ``[B, T, c]``; :param conv_state: ``[B, c, k]`` (``k = d_conv - 1``);
    :param seg: ``[B, T]`` segment ids (0 = the state's); :param weight: ``[c, d_conv]``,
    tap ``d_conv - 1`` is the current step; :param bias: ``[c]``. :return: ``[B, T, c]``.
    """
    length = xBC.shape[1]
    d_conv = weight.shape[-1]
    k = d_conv - 1
    full = torch.cat([conv_state.transpose(1, 2), xBC], dim=1)  # [b, k + T, c]
    seg_full = torch.cat([seg.new_zeros(seg.shape[0], k), seg], dim=1)
    out = xBC * weight[:, -1] + bias
    for lag in range(1, d_conv):
        past = full[:, k - lag : k - lag + length]
        same = (seg_full[:, k - lag : k - lag + length] == seg)[..., None]
        out = out + past * same * weight[:, -1 - lag]
    return out


def final_conv_state(
    xBC: Tensor, conv_state: Tensor, seg: Tensor, n_valid: Tensor | None = None
) -> Tensor:
    """The last ``k`` conv inputs after a sequence, zeroed where they precede its last reset.

    :param xBC: ``[B, T, c]``; :param conv_state: ``[B, c, k]``; :param seg: ``[B, T]``;
    :param n_valid: ``[B]`` or None: only row ``b``'s first ``n_valid[b]`` steps are real
        (trailing padding, see :meth:`Mamba2Block.forward`). :return: ``[B, c, k]``.
    """
    k = conv_state.shape[-1]
    if k == 0:
        return conv_state
    full = torch.cat([conv_state.transpose(1, 2), xBC], dim=1)
    seg_full = torch.cat([seg.new_zeros(seg.shape[0], k), seg], dim=1)
    if n_valid is None:
        full, seg_full = full[:, -k:], seg_full[:, -k:]
    else:  # the k positions before row b's first padding step: k + n_valid - k .. - 1
        idx = n_valid[:, None] + torch.arange(k, device=xBC.device)  # [B, k]
        full = full.gather(1, idx[..., None].expand(-1, -1, full.shape[-1]))
        seg_full = seg_full.gather(1, idx)
    same = (seg_full == seg_full[:, -1:])[..., None]
    return (full * same).transpose(1, 2).contiguous()


def blocks_fusable(blocks: Sequence[Mamba2Block]) -> bool:
    """True when :func:`mamba2_forward_multi` can run ``blocks`` side by side: the same sizes
    (``d_model``, ``d_state``, ``d_conv``, ``expand``, ``headdim``, ``chunk_size``) and one
    group each. Time scales (``dt``, ``A``) may differ: they are per-head parameters."""
    first = blocks[0]
    sizes = ("d_model", "d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
    return first.ngroups == 1 and all(
        all(getattr(b, a) == getattr(first, a) for a in sizes) for b in blocks
    )


def mamba2_forward_multi(
    blocks: Sequence[Mamba2Block],
    x: Tensor,
    states: Sequence[Mamba2State],
    episode_starts: Tensor | None = None,
) -> tuple[Tensor, list[Mamba2State]]:
    """Run ``M`` same-sized blocks, each on its own input, as one set of tensor ops.

    The same function as ``[blocks[m](x[:, :, m], states[m], episode_starts)]`` (pure path;
    tested against it): the blocks' heads are concatenated along the SSD head axis with one
    B/C group per block, their conv channels side by side, and the projections run as batched
    matmuls, so ``M`` blocks take one op where the loop takes ``M`` (what that saves:
    ``docs/measurements.md``, "fused streams"; most of the streams' time is the scan's
    arithmetic, not per-op overhead). Parameters stay in the blocks (state dicts are
    unchanged).

    :param blocks: ``M`` blocks with :func:`blocks_fusable` true.
    :param x: ``[B, T, M, d_model]``.
    :param states: ``M`` states, one per block.
    :param episode_starts: ``[B, T]`` bool or None.
    :return: ``y [B, T, M, d_model]`` and the ``M`` new states.
    """
    first = blocks[0]
    batch, length, n, _ = x.shape
    heads, p, d_state, c = first.nheads, first.headdim, first.d_state, first.conv_dim
    w_in = torch.stack([b.in_proj.weight for b in blocks])  # [M, e, d]
    z, xBC_raw, dt_raw = torch.split(
        torch.einsum("btmd,med->btme", x, w_in), [first.d_inner, c, heads], dim=-1
    )
    seg = segment_ids(episode_starts, batch, length, x.device)
    xBC_raw = xBC_raw.reshape(batch, length, n * c)  # channels block-major
    conv_state = torch.cat([s.conv for s in states], dim=1)  # [B, M*c, k]
    conv_w = torch.cat([b.conv1d.weight[:, 0, :] for b in blocks])
    conv_b = torch.cat([b.conv1d.bias for b in blocks])
    xBC = F.silu(causal_conv(xBC_raw, conv_state, seg, conv_w, conv_b)).view(batch, length, n, c)
    xs, B, C = torch.split(xBC, [first.d_inner, d_state, d_state], dim=-1)  # B, C: [b, t, M, N]
    xs = xs.reshape(batch, length, n * heads, p)
    dt = F.softplus(
        dt_raw.reshape(batch, length, n * heads) + torch.cat([b.dt_bias for b in blocks])
    )
    A = -torch.exp(torch.cat([b.A_log for b in blocks]))
    y, ssm = ssd_scan_chunked(
        xs * dt[..., None],
        dt * A,
        B,
        C,
        initial_state=torch.cat([s.ssm for s in states], dim=1),
        resets=episode_starts,
        chunk_size=first.chunk_size,
    )
    y = y + xs * torch.cat([b.D for b in blocks])[:, None]
    y = rms_norm_each(y.reshape(batch, length, n, first.d_inner), [b.norm for b in blocks], z)
    y = torch.einsum("btmi,moi->btmo", y, torch.stack([b.out_proj.weight for b in blocks]))
    conv_final = final_conv_state(xBC_raw, conv_state, seg).view(batch, n, c, -1)
    ssm = ssm.view(batch, n, heads, p, d_state)
    return y, [Mamba2State(conv_final[:, m], ssm[:, m]) for m in range(n)]


def mamba2_step_multi(
    blocks: Sequence[Mamba2Block], x: Tensor, states: Sequence[Mamba2State]
) -> tuple[Tensor, list[Mamba2State]]:
    """One step of ``M`` same-sized blocks (:meth:`Mamba2Block.step` of each, fused).

    :param x: ``[B, M, d_model]``; :param states: ``M`` states, already masked at episode
    starts. :return: ``y [B, M, d_model]`` and the ``M`` new states.
    """
    first = blocks[0]
    batch, n, _ = x.shape
    heads, p, d_state, c = first.nheads, first.headdim, first.d_state, first.conv_dim
    w_in = torch.stack([b.in_proj.weight for b in blocks])
    z, xBC_raw, dt_raw = torch.split(
        torch.einsum("bmd,med->bme", x, w_in), [first.d_inner, c, heads], dim=-1
    )
    window = torch.cat([torch.stack([s.conv for s in states], 1), xBC_raw[..., None]], dim=-1)
    conv_w = torch.stack([b.conv1d.weight[:, 0, :] for b in blocks])  # [M, c, d_conv]
    conv_b = torch.stack([b.conv1d.bias for b in blocks])
    xBC = F.silu((window * conv_w).sum(-1) + conv_b)  # [b, M, c]
    xs, B, C = torch.split(xBC, [first.d_inner, d_state, d_state], dim=-1)
    xs = xs.reshape(batch, n, heads, p)
    dt = F.softplus(dt_raw + torch.stack([b.dt_bias for b in blocks]))  # [b, M, H]
    decay = torch.exp(dt * -torch.exp(torch.stack([b.A_log for b in blocks])))
    ssm = torch.stack([s.ssm for s in states], 1)  # [b, M, H, P, N]
    ssm = decay[..., None, None] * ssm + (xs * dt[..., None])[..., None] * B[:, :, None, None, :]
    y = (ssm.view(batch, n, heads * p, d_state) @ C[..., None]).view(batch, n, heads, p)
    y = y + xs * torch.stack([b.D for b in blocks])[..., None]
    y = rms_norm_each(y.reshape(batch, n, first.d_inner), [b.norm for b in blocks], z)
    y = torch.einsum("bmi,moi->bmo", y, torch.stack([b.out_proj.weight for b in blocks]))
    conv = window[..., 1:]
    return y, [Mamba2State(conv[:, m], ssm[:, m]) for m in range(n)]


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
    return backend
