"""Slots by token kind (logged and reported) and the masking test of the gate's selection."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces

import envs
from agents.experiment.slots import masked_policy_step, selection_test, slot_report
from agents.policy import ThalamusPolicy
from agents.selection import (
    TOKEN_KINDS,
    kept_slots,
    mask_tokens,
    slot_kind_fractions,
    slot_kind_stats,
    token_kinds,
)
from agents.tokenizer import TokenLayout

SMALL = dict(d_model=32, d_task=16, n_heads=4, top_k=8, phase_dim=4, d_workspace=32)

#: A 2x2 grid (cells 0-3), the proprio token 4, three word slots 5-7.
LAYOUT = TokenLayout("image", (2, 2), slice(0, 4), "mission", slice(5, 8), 4, 8)


@pytest.fixture(scope="module")
def env() -> gym.Env:
    return envs.make_env("BabyAI-GoToLocal-v0")


def make_policy(space: spaces.Dict, **thalamus: Any) -> ThalamusPolicy:
    th.manual_seed(0)
    return ThalamusPolicy(
        space, spaces.Discrete(7), lambda _: 1e-3, thalamus={**SMALL, **thalamus}
    ).eval()


def test_token_kinds_follow_the_layout() -> None:
    kinds = token_kinds(LAYOUT, 8)
    assert [TOKEN_KINDS[k] for k in kinds] == ["cell"] * 4 + ["proprio"] + ["word"] * 3
    assert len(token_kinds(LAYOUT, 6)) == 6  # a batch that dropped trailing word slots
    with pytest.raises(ValueError, match="exceeds"):
        token_kinds(LAYOUT, 9)


def test_slot_fractions_count_kept_slots_by_kind() -> None:
    mask = th.ones(2, 8, dtype=th.bool)
    mask[1, 2:] = False  # row 1: two valid tokens; K = 4 > 2, the gate repeats index 0
    indices = th.tensor([[5, 0, 4, 6], [1, 0, 0, 0]])
    kept = kept_slots(indices, mask)
    assert kept.tolist() == [[True] * 4, [True, True, False, False]]
    fractions = slot_kind_fractions(indices, mask, LAYOUT)
    th.testing.assert_close(fractions, th.tensor([[0.25, 0.5, 0.25], [1.0, 0.0, 0.0]]))
    stats = slot_kind_stats(indices, mask, LAYOUT)
    assert set(stats) == {"slots/cell", "slots/word", "slots/proprio"}
    th.testing.assert_close(stats["slots/word"], th.tensor(0.25))
    # The gate off: slot k is token k, kept where the token is valid.
    all_tokens = th.arange(8).expand(2, 8)
    off = slot_kind_fractions(all_tokens, mask, LAYOUT, gate_enabled=False)
    th.testing.assert_close(off[1], th.tensor([1.0, 0.0, 0.0]))
    th.testing.assert_close(off[0], th.tensor([4 / 8, 3 / 8, 1 / 8]))


def test_policy_stats_log_slots_by_kind(env: gym.Env) -> None:
    """Training logs every key of ``act``'s stats as ``thalamus/<key>``."""
    policy = make_policy(env.observation_space)
    obs, _ = env.reset(seed=0)
    obs_tensor, _ = policy.obs_to_tensor(obs)
    with th.no_grad():
        step = policy.act(obs_tensor, None, th.tensor([True]))
        quiet = policy.act(obs_tensor, None, th.tensor([True]), with_stats=False)
    stats = step.thalamus.stats
    fractions = [float(stats[f"slots/{kind}"]) for kind in TOKEN_KINDS]
    assert sum(fractions) == pytest.approx(1.0)
    t = policy.tokenizer(obs_tensor)
    expected = slot_kind_fractions(
        step.thalamus.indices, t.token_mask, policy.tokenizer.token_layout
    )
    np.testing.assert_allclose(fractions, expected[0].numpy(), rtol=1e-6)
    assert quiet.thalamus.stats == {}


def test_masking_hides_the_kept_tokens_or_as_many_random_ones(env: gym.Env) -> None:
    policy = make_policy(env.observation_space)
    obs, _ = env.reset(seed=1)
    obs_tensor, _ = policy.obs_to_tensor(obs)
    starts = th.tensor([True])
    with th.no_grad():
        full, out, _, mask = masked_policy_step(policy, obs_tensor, None, starts)
        step = policy.act(obs_tensor, None, starts, deterministic=True)
        kept = kept_slots(out.indices, mask)
        hidden_kept = mask_tokens(mask, out.indices, kept, "kept")
        generator = th.Generator().manual_seed(0)
        hidden_random = mask_tokens(mask, out.indices, kept, "random", generator)
        _, out_kept, _, _ = masked_policy_step(policy, obs_tensor, None, starts, hidden_kept)
    # Without a mask the step is act's.
    th.testing.assert_close(
        full.distribution.logits,
        policy._action_distribution(step.thalamus.features).distribution.logits,
    )
    assert mask_tokens(mask, out.indices, kept, "none") is mask
    assert hidden_kept is not None and hidden_random is not None
    k = int(kept.sum())
    assert int(mask.sum() - hidden_kept.sum()) == k == int(mask.sum() - hidden_random.sum())
    assert not hidden_kept[0, out.indices[0]].any()  # exactly the kept ones are gone
    assert not (hidden_random & ~mask).any()  # only valid tokens are hidden
    # The gate then keeps K other tokens.
    assert not set(out_kept.indices[0].tolist()) & set(out.indices[0].tolist())
    # Too few valid tokens to hide K and keep one: the caller must skip the step.
    few = th.zeros_like(mask)
    few[0, :k] = True
    assert mask_tokens(few, out.indices, kept, "kept") is None
    with pytest.raises(ValueError, match="not one of"):
        mask_tokens(mask, out.indices, kept, "all")


def test_selection_test_and_slot_report_run_and_repeat(env: gym.Env) -> None:
    model = SimpleNamespace(policy=make_policy(env.observation_space))
    result = selection_test(model, env, n_episodes=1, seed=3)
    assert result["steps"] > 0 and result["skipped"] == 0
    assert result["kl_kept"] > 0 and result["kl_random"] > 0
    assert set(result["success"]) == {"none", "kept", "random"}
    assert selection_test(model, env, n_episodes=1, seed=3) == result  # seeded
    report = slot_report(model, env, n_episodes=1, seed=3)
    assert report["steps"] == result["steps"] and report["top_k"] == SMALL["top_k"]
    assert sum(report[kind]["mean"] for kind in TOKEN_KINDS) == pytest.approx(1.0)


def test_selection_needs_the_thalamus_agent(env: gym.Env) -> None:
    with pytest.raises(ValueError, match="thalamus agent"):
        selection_test(SimpleNamespace(policy=object()), env, 1, 0)
