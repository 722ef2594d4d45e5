"""The Mamba-2 state-space dual (SSD) scan with initial state and exact episode resets.

Two implementations of one function:

* :func:`ssd_scan_reference` steps through time one position at a time. It is slow and
  obviously right; tests run it in float64 as the ground truth.
* :func:`ssd_scan_chunked` is the pure-PyTorch fast path: the sequence is cut into chunks,
  inside a chunk the scan is a masked matmul (no Python loop over time), and only the
  chunk-end states are passed on with a loop over chunks.

The recurrence, per head ``h`` (heads share ``B``/``C`` within a group)::

    state_t = exp(dA_t) * state_{t-1} + x_t ⊗ B_t      # state: [headdim, d_state]
    y_t     = state_t · C_t

where ``x`` has already been multiplied by ``dt``. A reset at ``t`` (``resets[b, t]``)
means position ``t`` starts a new episode: the state is zeroed before ``t``, so nothing
before ``t`` (the initial state included) reaches ``t`` or later. Resets are handled with
segment ids rather than by setting the decay to ``-inf``, which keeps every exponent a
sum over one segment (no cancellation of large cumulative sums, no ``inf - inf``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ssd_scan_reference", "ssd_scan_chunked", "segment_ids"]


def segment_ids(resets: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """Episode segment id of every position: ``cumsum(resets)``; 0 = the initial state's.

    :param resets: ``[B, T]`` bool or None (no resets).
    :return: ``[B, T]`` int64.
    """
    if resets is None:
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    return torch.cumsum(resets.long(), dim=1)


def _expand_groups(t: Tensor, nheads: int) -> Tensor:
    """``[..., G, N]`` -> ``[..., H, N]`` by repeating each group for its heads."""
    ngroups = t.shape[-2]
    if ngroups == nheads:
        return t
    return t.repeat_interleave(nheads // ngroups, dim=-2)


def ssd_scan_reference(
    x: Tensor,
    dA: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
    resets: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Step-by-step SSD scan; the reference the chunked path is tested against.

    :param x: ``[B, T, H, P]`` inputs, already multiplied by ``dt``.
    :param dA: ``[B, T, H]`` log-decays ``dt * A`` (<= 0).
    :param B: ``[B, T, G, N]`` input projections (``H`` divisible by ``G``).
    :param C: ``[B, T, G, N]`` output projections.
    :param initial_state: ``[B, H, P, N]`` or None (zeros).
    :param resets: ``[B, T]`` bool, True where a new episode starts, or None.
    :return: ``y [B, T, H, P]`` and the final state ``[B, H, P, N]``.
    """
    batch, length, nheads, headdim = x.shape
    d_state = B.shape[-1]
    Bh = _expand_groups(B, nheads)
    Ch = _expand_groups(C, nheads)
    if initial_state is None:
        state = x.new_zeros(batch, nheads, headdim, d_state)
    else:
        state = initial_state.to(x.dtype)
    ys = []
    for t in range(length):
        if resets is not None:
            state = state * (~resets[:, t]).to(x.dtype)[:, None, None, None]
        decay = torch.exp(dA[:, t])[:, :, None, None]
        state = decay * state + x[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state


def _segsum(dA: Tensor) -> Tensor:
    """Stable segment sums: ``out[..., t, s] = sum(dA[..., s+1 : t+1])`` for ``s <= t``, else -inf.

    Computed by a masked cumulative sum, not as ``cumsum[t] - cumsum[s]``, so long chunks of
    strong decay do not lose precision to cancellation.

    :param dA: ``[..., L]``.
    :return: ``[..., L, L]``.
    """
    length = dA.shape[-1]
    rep = dA[..., None].expand(*dA.shape, length)  # rep[..., t, s] = dA[t]
    strict_lower = torch.ones(length, length, dtype=torch.bool, device=dA.device).tril(-1)
    sums = torch.cumsum(rep.masked_fill(~strict_lower, 0.0), dim=-2)
    lower = torch.ones(length, length, dtype=torch.bool, device=dA.device).tril()
    return sums.masked_fill(~lower, float("-inf"))


def ssd_scan_chunked(
    x: Tensor,
    dA: Tensor,
    B: Tensor,
    C: Tensor,
    initial_state: Tensor | None = None,
    resets: Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (Mamba-2's block decomposition) in pure PyTorch.

    Same arguments and results as :func:`ssd_scan_reference`. Cost per chunk of length
    ``L``: O(L² · (N + P)) per head for the intra-chunk part, O(L · P · N) for the states.

    :param chunk_size: chunk length ``L``; ``T`` need not be a multiple of it.
    """
    batch, length, nheads, headdim = x.shape
    ngroups, d_state = B.shape[-2], B.shape[-1]
    device, dtype = x.device, x.dtype
    seg = segment_ids(resets, batch, length, device)
    # Segment id of the state that enters chunk c: the id of its last position before c.
    n_chunks = -(-length // chunk_size)
    pad = n_chunks * chunk_size - length
    if pad:
        # Padding: no input, no decay, same segment as the last real position, so the
        # outputs are unchanged and the final state is the state after the last real step.
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad))
        dA = torch.nn.functional.pad(dA, (0, 0, 0, pad))
        B = torch.nn.functional.pad(B, (0, 0, 0, 0, 0, pad))
        C = torch.nn.functional.pad(C, (0, 0, 0, 0, 0, pad))
        seg = torch.cat([seg, seg[:, -1:].expand(batch, pad)], dim=1)
    L = chunk_size
    # [b, c, l, ...] chunked views; heads first for the decay maths.
    xc = x.reshape(batch, n_chunks, L, nheads, headdim)
    Bc = B.reshape(batch, n_chunks, L, ngroups, d_state)
    Cc = C.reshape(batch, n_chunks, L, ngroups, d_state)
    dAc = dA.reshape(batch, n_chunks, L, nheads).permute(0, 1, 3, 2)  # [b, c, h, l]
    segc = seg.reshape(batch, n_chunks, L)
    seg_in = torch.cat([seg.new_zeros(batch, 1), segc[:, :-1, -1]], dim=1)  # [b, c]

    # Intra-chunk decay matrix with segment masking: decay[b,c,h,t,s] from s to t.
    same_seg = segc[:, :, :, None] == segc[:, :, None, :]  # [b, c, t, s]
    decay = torch.exp(_segsum(dAc)) * same_seg[:, :, None].to(dtype)  # [b, c, h, t, s]

    heads_per_group = nheads // ngroups
    # C_t · B_s per group, broadcast to its heads.
    scores = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)  # [b, c, g, t, s]
    scores = scores.repeat_interleave(heads_per_group, dim=2) if heads_per_group > 1 else scores
    y_diag = torch.einsum("bchts,bcshp->bcthp", scores * decay, xc)

    # State each chunk contributes at its end: sum_s decay(s -> end) x_s ⊗ B_s.
    decay_to_end = decay[..., -1, :]  # [b, c, h, s]
    Bh = _expand_groups(Bc, nheads)  # [b, c, l, h, n]
    chunk_states = torch.einsum("bchs,bcshp,bcshn->bchpn", decay_to_end, xc, Bh)

    # Decay from the chunk start (the incoming state) to each position t, masked to the
    # positions still in the incoming state's segment.
    cum_in = torch.cumsum(dAc, dim=-1)  # [b, c, h, l], sums of one chunk: no cancellation
    reaches = (segc == seg_in[:, :, None]).to(dtype)  # [b, c, l]
    decay_from_start = torch.exp(cum_in) * reaches[:, :, None, :]  # [b, c, h, l]
    chunk_decay = decay_from_start[..., -1]  # [b, c, h]: whole-chunk decay of the incoming state

    # Pass states across chunks (a loop over chunks, not over time steps).
    if initial_state is None:
        state = x.new_zeros(batch, nheads, headdim, d_state)
    else:
        state = initial_state.to(dtype)
    states_in = []
    for c in range(n_chunks):
        states_in.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_states[:, c]
    prev_states = torch.stack(states_in, dim=1)  # [b, c, h, p, n]

    Ch = _expand_groups(Cc, nheads)  # [b, c, l, h, n]
    y_off = torch.einsum("bclhn,bchpn,bchl->bclhp", Ch, prev_states, decay_from_start)
    y = (y_diag + y_off).reshape(batch, n_chunks * L, nheads, headdim)[:, :length]
    return y, state
