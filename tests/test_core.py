"""ThalamusCore: step == sequence, exact resets, gradients to the gate and the feedback layer,
ablation switches, bad input."""

from __future__ import annotations

import pytest
import torch

from tests.test_distributed import random_valid_state, three_streams
from tests.test_mamba2 import random_resets
from thalamus_rl import StreamConfig, ThalamusConfig, ThalamusCore

ATOL = 1e-5
D, D_TASK, N, F = 32, 16, 20, 3


def make(**overrides) -> ThalamusCore:
    torch.manual_seed(0)
    args = dict(d_model=D, d_task=D_TASK, top_k=6, d_workspace=16, chunk_size=8, backend="pure")
    args.update(overrides)
    return ThalamusCore(ThalamusConfig(**args))


def inputs(batch: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(batch, length, N, D, generator=g)
    mask = torch.rand(batch, length, N, generator=g) < 0.7
    mask[..., 0] = True
    task = torch.randn(batch, length, D_TASK, generator=g)
    feedback = torch.randn(batch, length, F, generator=g)
    positions = torch.rand(batch, length, N, 2, generator=g)
    return tokens, mask, task, feedback, positions


def random_state(core: ThalamusCore, batch: int):
    return random_valid_state(core.initial_state(batch), seed=3)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_iterations": 1},
        {"n_iterations": 3},
        {"use_feedback": False},
        {"gate_enabled": False},
        {"streams": [StreamConfig(name="only", n_layers=2)]},
        {"workspace_layers": 0},
        {"readout_salience_bias": True},
        {"streams": three_streams(clock=4, capacity=6)},
    ],
    ids=[
        "default",
        "one-iteration",
        "three-iterations",
        "no-feedback",
        "gate-off",
        "one-stream",
        "no-workspace",
        "readout-salience-bias",
        "three-streams-clock-episodic",
    ],
)
def test_step_equals_forward_with_resets(overrides):
    core = make(**overrides)
    batch, length = 3, 17
    tokens, mask, task, feedback, positions = inputs(batch, length)
    resets = random_resets(batch, length)
    state0 = random_state(core, batch)
    out, state = core(tokens, mask, task, feedback, positions, state0, resets)
    s = state0
    steps = []
    for t in range(length):
        o, s = core.step(
            tokens[:, t], mask[:, t], task[:, t], feedback[:, t], positions[:, t], s, resets[:, t]
        )
        steps.append(o)
    torch.testing.assert_close(
        torch.stack([o.features for o in steps], 1), out.features, atol=ATOL, rtol=ATOL
    )
    torch.testing.assert_close(
        torch.stack([o.stream_weights for o in steps], 1), out.stream_weights, atol=ATOL, rtol=ATOL
    )
    assert torch.equal(torch.stack([o.indices for o in steps], 1), out.indices)
    torch.testing.assert_close(s.flatten(), state.flatten(), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("t_reset", [0, 6])
def test_reset_equals_fresh_sequence(t_reset):
    core = make()
    tokens, mask, task, feedback, positions = inputs(2, 15)
    resets = torch.zeros(2, 15, dtype=torch.bool)
    resets[:, t_reset] = True
    out, state = core(tokens, mask, task, feedback, positions, random_state(core, 2), resets)
    fresh, state_fresh = core(*(t[:, t_reset:] for t in (tokens, mask, task, feedback, positions)))
    torch.testing.assert_close(out.features[:, t_reset:], fresh.features, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.flatten(), state_fresh.flatten(), atol=ATOL, rtol=ATOL)


def test_carrying_state_equals_one_call():
    core = make()
    tokens, mask, task, feedback, positions = inputs(2, 20)
    resets = random_resets(2, 20, seed=4)
    state0 = random_state(core, 2)
    out, state = core(tokens, mask, task, feedback, positions, state0, resets)
    first = [t[:, :9] for t in (tokens, mask, task, feedback, positions)]
    second = [t[:, 9:] for t in (tokens, mask, task, feedback, positions)]
    o1, s1 = core(*first, state0, resets[:, :9])
    o2, s2 = core(*second, s1, resets[:, 9:])
    torch.testing.assert_close(
        torch.cat([o1.features, o2.features], 1), out.features, atol=ATOL, rtol=ATOL
    )
    torch.testing.assert_close(s2.flatten(), state.flatten(), atol=ATOL, rtol=ATOL)


def test_gate_scoring_and_feedback_layer_get_gradient_from_the_features():
    """The bug of the prototypes: a top-K that could not learn, a feedback layer off the graph."""
    core = make()
    out, _ = core(*inputs(2, 8))
    out.features.square().mean().backward()
    gate = core.gate
    for name in ("query_proj.weight", "key_proj.weight"):
        grad = dict(gate.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    for name, p in gate.feedback_layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"feedback_layer.{name}"
    for name, p in core.streams.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_feedback_off_removes_the_feedback_layer_and_ignores_reward():
    core = make(use_feedback=False)
    assert core.gate.feedback_layer is None
    tokens, mask, task, feedback, positions = inputs(2, 6)
    a, _ = core(tokens, mask, task, feedback, positions)
    b, _ = core(tokens, mask, task, feedback * 10 + 3, positions)
    torch.testing.assert_close(a.features, b.features)
    assert "feedback_gain" not in a.stats


def test_task_changes_selection_and_masked_tokens_never_win():
    core = make()
    tokens, mask, task, feedback, positions = inputs(4, 10)
    out, _ = core(tokens, mask, task, feedback, positions)
    out2, _ = core(tokens, mask, -task, feedback, positions)
    assert not torch.equal(out.indices, out2.indices)
    picked_valid = mask.gather(-1, out.indices)
    kept = out.gate_weights > 0
    assert picked_valid[kept].all()


def test_k_larger_than_valid_tokens():
    core = make(top_k=12)
    tokens, mask, task, feedback, positions = inputs(2, 5)
    mask[:] = False
    mask[..., :3] = True  # 3 valid tokens, K = 12
    out, _ = core(tokens, mask, task, feedback, positions)
    assert torch.isfinite(out.features).all()
    assert ((out.gate_weights > 0).sum(-1) == 3).all()


def test_outputs_and_stats():
    core = make()
    out, state = core(*inputs(2, 7))
    assert out.features.shape == (2, 7, core.features_dim)
    assert out.salience.shape == (2, 7, N)
    assert out.indices.shape == out.gate_weights.shape == (2, 7, 6)
    assert out.phase.shape == (2, 7, 6, 2 * core.config.phase_dim)
    assert out.stream_weights.shape == (2, 7, 2)
    expected = {
        "gate_entropy",
        "selected_salience",
        "temperature",
        "fatigue_strength",
        "phase_scale",
        "feedback_gain",
        "stream_weight/visual",
        "stream_weight/semantic",
    }
    assert set(out.stats) == expected
    assert all(
        v.ndim == 0 and torch.isfinite(v) and not v.requires_grad for v in out.stats.values()
    )
    # The fatigue (and its strength) exists from the second feedback iteration on.
    out, _ = make(n_iterations=1)(*inputs(2, 7))
    assert set(out.stats) == expected - {"fatigue_strength"}


def test_stats_can_be_skipped_without_changing_the_outputs():
    core = make()
    x = inputs(2, 5)
    with_stats, state_a = core(*x)
    without, state_b = core(*x, with_stats=False)
    assert without.stats == {} and with_stats.stats
    torch.testing.assert_close(without.features, with_stats.features, rtol=0, atol=0)
    torch.testing.assert_close(state_b.prev_workspace, state_a.prev_workspace, rtol=0, atol=0)
    step, _ = core.step(*(t[:, 0] for t in x), with_stats=False)
    assert step.stats == {}
    torch.testing.assert_close(step.features, with_stats.features[:, 0], rtol=1e-5, atol=1e-5)


def test_config_from_dicts_and_validation():
    cfg = ThalamusConfig(streams=[{"name": "a"}, {"name": "b", "dt_min": 0.01, "dt_max": 0.02}])
    assert [s.name for s in cfg.streams] == ["a", "b"]
    assert ThalamusConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="top_k"):
        ThalamusConfig(top_k=0)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        ThalamusConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="backend"):
        ThalamusConfig(backend="triton")


def test_bad_input_raises_with_the_shape():
    core = make()
    tokens, mask, task, feedback, positions = inputs(2, 4)
    with pytest.raises(ValueError, match="tokens must be"):
        core(tokens[..., :-1], mask, task, feedback)
    with pytest.raises(ValueError, match="token_mask"):
        core(tokens, mask[..., :-1], task, feedback)
    with pytest.raises(ValueError, match="d_task"):
        core(tokens, mask, task[..., :-1], feedback)
    with pytest.raises(ValueError, match="n_feedback_signals"):
        core(tokens, mask, task, feedback[..., :-1])
    no_valid = mask.clone()
    no_valid[0, 0] = False
    with pytest.raises(ValueError, match="valid"):
        core(tokens, no_valid, task, feedback)
    bad = tokens.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        core(bad, mask, task, feedback)


def test_wrong_episode_starts_dtype_positions_and_empty_sequences_are_named():
    """Issue 32 row 12: these gave raw torch errors (or none) instead of the core's own."""
    core = make()
    tokens, mask, task, feedback, positions = inputs(2, 4)
    starts = torch.zeros(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"episode_starts must be \[B, T\] = \(2, 4\).*\(4, 2\)"):
        core(tokens, mask, task, feedback, episode_starts=starts.T)
    with pytest.raises(ValueError, match=r"episode_starts must be \[B\] = \(2,\).*\(2, 4\)"):
        core.step(tokens[:, 0], mask[:, 0], task[:, 0], feedback[:, 0], episode_starts=starts)
    with pytest.raises(ValueError, match=r"tokens must be torch.float32.*got torch.float64"):
        core(tokens.double(), mask, task, feedback)
    with pytest.raises(ValueError, match=r"feedback must be torch.float32"):
        core(tokens, mask, task, feedback.double())
    with pytest.raises(ValueError, match=r"token_mask must be bool"):
        core(tokens, mask.float(), task, feedback)
    with pytest.raises(ValueError, match=r"positions must be \[B, T, N, 2\]"):
        core(tokens, mask, task, feedback, positions=positions[..., :1])
    with pytest.raises(ValueError, match=r"T = 0 steps"):
        core(tokens[:, :0], mask[:, :0], task[:, :0], feedback[:, :0])


def test_long_sequence_is_finite():
    core = make(chunk_size=64)
    tokens, mask, task, feedback, positions = inputs(1, 1024)
    out, _ = core(tokens, mask, task, feedback, positions, None, random_resets(1, 1024, p=0.01))
    out.features.mean().backward()
    assert torch.isfinite(out.features).all()
    assert all(torch.isfinite(p.grad).all() for p in core.parameters() if p.grad is not None)


def _scorer_grad_norm(**overrides) -> float:
    """|d loss / d gate.key_proj| with K >= N, so the dropped-token summary is empty and the
    kept tokens' weights are the only way salience reaches the features."""
    core = make(top_k=N, use_feedback=False, **overrides)
    tokens, mask, task, feedback, positions = inputs(2, 5)
    out, _ = core(tokens, mask, task, feedback, positions)
    g = torch.Generator().manual_seed(7)
    (
        out.features * torch.randn(out.features.shape, generator=g, dtype=out.features.dtype)
    ).sum().backward()
    return core.gate.key_proj.weight.grad.norm().item()


def test_readout_salience_bias_lets_salience_reach_the_features():
    """Without a workspace the readout's per-token LayerNorm cancels the gate weights: the
    scorer gets (almost) no gradient. With the readout's log-weight bias it does."""
    without = _scorer_grad_norm(workspace_layers=0)
    with_bias = _scorer_grad_norm(workspace_layers=0, readout_salience_bias=True)
    assert without < 1e-3 * with_bias
    assert with_bias > 1e-3


def test_readout_salience_bias_is_a_no_op_when_the_gate_is_off():
    """Gate off: every kept weight is 1, so the bias is 0 and the outputs are identical."""
    tokens, mask, task, feedback, positions = inputs(2, 4)
    plain = make(gate_enabled=False)
    biased = make(gate_enabled=False, readout_salience_bias=True)
    biased.load_state_dict(plain.state_dict())
    a, _ = plain(tokens, mask, task, feedback, positions)
    b, _ = biased(tokens, mask, task, feedback, positions)
    torch.testing.assert_close(a.features, b.features, atol=ATOL, rtol=ATOL)
