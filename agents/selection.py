"""What the thalamus gate selects, by token kind, and token masks that hide a selection.

* :func:`slot_kind_fractions` / :func:`slot_kind_stats`: of the K slots the gate kept at a
  step, the fraction that hold grid cells, mission words and the proprio (agent state) token.
  :class:`agents.policy.ThalamusExtractor` adds them to the core's stats, so training logs
  them as ``thalamus/slots/<kind>``.
* :func:`mask_tokens`: a token mask with the kept (or as many random) tokens hidden.

The diagnoses built on them (the slot report and the selection test of
``scripts/evaluate.py``) live in :mod:`agents.experiment.slots`.
"""

from __future__ import annotations

import torch as th

from agents.tokenizer import TokenLayout

__all__ = [
    "MASK_MODES",
    "TOKEN_KINDS",
    "kept_slots",
    "mask_tokens",
    "slot_kind_fractions",
    "slot_kind_stats",
    "token_kinds",
]

#: Kinds of tokens, in the order of :func:`slot_kind_fractions`' last dimension.
TOKEN_KINDS = ("cell", "word", "proprio")

#: What :func:`masked_policy_step` hides: nothing, the gate's kept tokens, random valid ones.
MASK_MODES = ("none", "kept", "random")


def token_kinds(layout: TokenLayout, n_tokens: int, device: th.device | None = None) -> th.Tensor:
    """Kind of each token position (index into :data:`TOKEN_KINDS`).

    :param layout: the tokenizer's :class:`~agents.tokenizer.TokenLayout`.
    :param n_tokens: ``N'``, tokens in this batch (trailing word slots may be dropped).
    :return: ``[N']`` long.
    """
    if n_tokens > layout.n_tokens:
        raise ValueError(f"n_tokens={n_tokens} exceeds the layout's {layout.n_tokens} tokens")
    kinds = th.full((n_tokens,), TOKEN_KINDS.index("word"), dtype=th.long, device=device)
    kinds[layout.image] = TOKEN_KINDS.index("cell")
    if layout.proprio < n_tokens:
        kinds[layout.proprio] = TOKEN_KINDS.index("proprio")
    return kinds


def kept_slots(indices: th.Tensor, token_mask: th.Tensor, gate_enabled: bool = True) -> th.Tensor:
    """Which of the K slots hold a kept (valid) token.

    :param indices: ``[*, K]`` the gate's selected token indices.
    :param token_mask: ``[*, N]`` bool, True = valid token.
    :param gate_enabled: False when the gate keeps every token (``thalamus.gate_enabled``).
    :return: ``[*, K]`` bool. With the gate on, slot ``k`` is kept when ``k`` < the number of
        valid tokens (the top-K puts the valid ones first; with K > N the extra slots repeat
        index 0); with it off, slot ``k`` is token ``k`` and kept when that token is valid.
    """
    valid = token_mask.gather(-1, indices)
    if not gate_enabled:
        return valid
    n_valid = token_mask.sum(-1, keepdim=True)
    return valid & (th.arange(indices.shape[-1], device=indices.device) < n_valid)


def slot_kind_fractions(
    indices: th.Tensor, token_mask: th.Tensor, layout: TokenLayout, gate_enabled: bool = True
) -> th.Tensor:
    """Per step, the fraction of the kept slots holding each kind of token.

    :param indices: ``[*, K]`` the gate's selected token indices.
    :param token_mask: ``[*, N]`` bool, True = valid token.
    :param layout: the tokenizer's token layout.
    :param gate_enabled: as in :func:`kept_slots`.
    :return: ``[*, len(TOKEN_KINDS)]`` float, each row sums to 1 (over :data:`TOKEN_KINDS`).
    """
    kept = kept_slots(indices, token_mask, gate_enabled)
    kinds = token_kinds(layout, token_mask.shape[-1], indices.device)[indices]  # [*, K]
    one_hot = th.nn.functional.one_hot(kinds, len(TOKEN_KINDS)).to(th.float32)
    counts = (one_hot * kept.unsqueeze(-1)).sum(-2)
    return counts / kept.sum(-1, keepdim=True).clamp_min(1)


def slot_kind_stats(
    indices: th.Tensor, token_mask: th.Tensor, layout: TokenLayout, gate_enabled: bool = True
) -> dict[str, th.Tensor]:
    """``{"slots/<kind>": mean fraction}`` over all steps of a batch, for the kinds the layout
    has (logged by training as ``thalamus/slots/<kind>``); arguments as
    :func:`slot_kind_fractions`."""
    with th.no_grad():
        fractions = slot_kind_fractions(indices, token_mask, layout, gate_enabled)
        mean = fractions.reshape(-1, len(TOKEN_KINDS)).mean(0)
    present = {
        "cell": layout.image.stop > layout.image.start,
        "word": layout.mission_key is not None,
        "proprio": True,
    }
    return {f"slots/{kind}": mean[i] for i, kind in enumerate(TOKEN_KINDS) if present[kind]}


# --------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------


def mask_tokens(
    token_mask: th.Tensor,
    indices: th.Tensor,
    kept: th.Tensor,
    mode: str,
    generator: th.Generator | None = None,
) -> th.Tensor | None:
    """A token mask with the gate's kept tokens, or as many random valid tokens, masked out.

    :param token_mask: ``[B, N]`` bool, True = valid.
    :param indices: ``[B, K]`` the gate's selection on the unmasked tokens.
    :param kept: ``[B, K]`` bool, :func:`kept_slots`.
    :param mode: one of :data:`MASK_MODES`.
    :param generator: RNG of the random choice (``"random"``).
    :return: ``[B, N]`` the new mask, or None where a row would keep no valid token (the
        gate needs one; the caller skips that step).
    """
    if mode not in MASK_MODES:
        raise ValueError(f"mask mode {mode!r} is not one of {', '.join(MASK_MODES)}")
    if mode == "none":
        return token_mask
    n_hide = kept.sum(-1)  # [B]
    if bool((token_mask.sum(-1) - n_hide < 1).any()):
        return None
    new = token_mask.clone()
    if mode == "kept":
        rows = th.arange(indices.shape[0], device=indices.device)[:, None].expand_as(indices)
        new[rows[kept], indices[kept]] = False
        return new
    for b in range(token_mask.shape[0]):
        valid = token_mask[b].nonzero().squeeze(-1)
        order = th.randperm(len(valid), generator=generator)[: int(n_hide[b])]
        new[b, valid[order.to(valid.device)]] = False
    return new
