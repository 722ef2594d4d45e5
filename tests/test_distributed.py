"""DistributedMamba: step == sequence, exact resets, competition, feedback, time scales."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_mamba2 import random_resets
from thalamus_rl import DistributedMamba, StreamConfig, ThalamusState, default_streams

ATOL = 1e-5


def make(n_iterations: int = 2, **kw) -> DistributedMamba:
    torch.manual_seed(0)
    args = dict(d_model=16, streams=default_streams(), d_workspace=8, chunk_size=8, backend="pure")
    args.update(kw)
    return DistributedMamba(n_iterations=n_iterations, **args)


def random_state(dm: DistributedMamba, batch: int) -> ThalamusState:
    g = torch.Generator().manual_seed(1)
    return dm.initial_state(batch).map(lambda t: torch.randn(t.shape, generator=g))


@pytest.mark.parametrize("n_iterations", [1, 2, 3])
def test_step_equals_forward_with_resets(n_iterations):
    dm = make(n_iterations)
    batch, length = 3, 21
    x = torch.randn(batch, length, 2, 16)
    resets = random_resets(batch, length)
    state0 = random_state(dm, batch)
    w, alpha, state = dm(x, state0, resets)
    s = state0
    ws, alphas = [], []
    for t in range(length):
        wt, at, s = dm.step(x[:, t], s, resets[:, t])
        ws.append(wt)
        alphas.append(at)
    torch.testing.assert_close(torch.stack(ws, 1), w, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(torch.stack(alphas, 1), alpha, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s.flatten(), state.flatten(), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("t_reset", [0, 5, 20])
def test_reset_equals_fresh_sequence(t_reset):
    dm = make(3)
    x = torch.randn(2, 21, 2, 16)
    resets = torch.zeros(2, 21, dtype=torch.bool)
    resets[:, t_reset] = True
    w, _, state = dm(x, random_state(dm, 2), resets)
    w_fresh, _, state_fresh = dm(x[:, t_reset:])
    torch.testing.assert_close(w[:, t_reset:], w_fresh, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.flatten(), state_fresh.flatten(), atol=ATOL, rtol=ATOL)


def test_carrying_state_equals_one_call():
    dm = make(2)
    x = torch.randn(3, 30, 2, 16)
    resets = random_resets(3, 30, seed=2)
    state0 = random_state(dm, 3)
    w, _, state = dm(x, state0, resets)
    w1, _, s1 = dm(x[:, :11], state0, resets[:, :11])
    w2, _, s2 = dm(x[:, 11:], s1, resets[:, 11:])
    torch.testing.assert_close(torch.cat([w1, w2], 1), w, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s2.flatten(), state.flatten(), atol=ATOL, rtol=ATOL)


def test_feedback_iteration_uses_previous_step_workspace_only():
    """Rule 3: with I=2, the output at t must not depend on inputs after t (causality),
    and iteration 2 must read the workspace (the outputs differ from I=1)."""
    dm2 = make(2)
    x = torch.randn(1, 12, 2, 16)
    w, _, _ = dm2(x)
    x_changed = x.clone()
    x_changed[:, 7:] += 1.0
    w_changed, _, _ = dm2(x_changed)
    torch.testing.assert_close(w_changed[:, :7], w[:, :7], atol=ATOL, rtol=ATOL)
    dm2.n_iterations = 1  # same weights, feedback off
    w1, _, _ = dm2(x)
    assert not torch.allclose(w1[:, 1:], w[:, 1:], atol=1e-4)
    # At t = 0 the fed-back workspace is zero, so the two agree there.
    torch.testing.assert_close(w1[:, 0], w[:, 0], atol=ATOL, rtol=ATOL)


def test_stream_weights_are_a_distribution_and_temperature_bounded():
    dm = make(2, min_temperature=0.1)
    _, alpha, _ = dm(torch.randn(2, 9, 2, 16))
    torch.testing.assert_close(alpha.sum(-1), torch.ones(2, 9))
    with torch.no_grad():
        dm.temperature_raw.fill_(-50.0)
    assert dm.temperature.item() >= 0.1


def test_fatigue_lowers_the_winner_of_the_previous_iteration():
    dm = make(2, fatigue_decay=0.0)
    outputs = torch.randn(4, 2, 16)
    _, alpha_plain = dm._compete(outputs, None)
    fatigue = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    _, alpha_tired = dm._compete(outputs, fatigue)
    assert (alpha_tired[:, 0] < alpha_plain[:, 0]).all()
    # The fatigue enters the scores scaled by the learned strength κ (small at init).
    torch.testing.assert_close(dm.fatigue_strength, torch.tensor(0.01))
    with torch.no_grad():
        dm.fatigue_strength_raw.fill_(math.log(math.expm1(1.0)))
    votes = torch.stack([v(outputs[:, m]) for m, v in enumerate(dm.vote)], dim=-2)
    scores = dm.score(votes).squeeze(-1)
    _, alpha_full = dm._compete(outputs, fatigue)
    torch.testing.assert_close(alpha_full, torch.softmax((scores - fatigue) / dm.temperature, -1))


def test_gradients_reach_streams_competition_and_feedback():
    dm = make(2)
    w, alpha, _ = dm(torch.randn(2, 10, 2, 16))
    (w.square().mean() + alpha[..., 0].mean()).backward()
    for name, p in dm.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_half_lives_visual_fast_semantic_slow():
    torch.manual_seed(0)
    dm = DistributedMamba(64, default_streams(), d_workspace=64)
    half = dm.half_lives()
    assert set(half) == {"visual", "semantic"}
    assert half["visual"].max() < 10.0, half["visual"]  # a few steps
    assert half["semantic"].min() > 10.0, half["semantic"]  # tens to hundreds of steps
    assert half["semantic"].max() < 400.0, half["semantic"]


def test_one_stream_works():
    dm = make(2, streams=[StreamConfig(name="only")])
    w, alpha, _ = dm(torch.randn(2, 5, 1, 16))
    assert w.shape == (2, 5, 8)
    torch.testing.assert_close(alpha, torch.ones(2, 5, 1))


def test_one_iteration_has_no_feedback_or_fatigue_parameters():
    one, two = make(1), make(2)
    assert one.feedback is None and one.fatigue_strength_raw is None
    names = {n for n, _ in two.named_parameters()} - {n for n, _ in one.named_parameters()}
    assert names == {"fatigue_strength_raw"} | {f"feedback.{m}.weight" for m in range(2)}
    assert float(one.fatigue_strength) == 0.0


def test_bad_configuration_and_input_raise():
    with pytest.raises(ValueError, match="unique"):
        DistributedMamba(16, [StreamConfig("a"), StreamConfig("a")])
    with pytest.raises(ValueError, match="n_iterations"):
        DistributedMamba(16, n_iterations=0)
    dm = make(2)
    with pytest.raises(ValueError, match="M=2 streams"):
        dm(torch.randn(2, 5, 3, 16))
    with pytest.raises(ValueError, match="batch size"):
        dm(torch.randn(2, 5, 2, 16), dm.initial_state(4))


def test_state_pytree_methods():
    dm = make(3)
    state = random_state(dm, 5)
    flat = state.flatten()
    assert flat.shape[0] == 5
    torch.testing.assert_close(state.unflatten(flat).flatten(), flat)
    sub = state.index(torch.tensor([1, 3]))
    assert sub.batch_size == 2
    torch.testing.assert_close(sub.flatten(), flat[[1, 3]])
    masked = state.mask(torch.tensor([True, False, False, True, False]))
    assert masked.flatten()[[0, 3]].abs().sum() == 0
    torch.testing.assert_close(masked.flatten()[[1, 2, 4]], flat[[1, 2, 4]])
    both = ThalamusState.cat([state.index(slice(0, 2)), state.index(slice(2, 5))])
    torch.testing.assert_close(both.flatten(), flat)
    assert not state.map(lambda t: t.requires_grad_()).detach().flatten().requires_grad
    with pytest.raises(ValueError, match="flat state"):
        state.unflatten(flat[:, :-1])


@pytest.mark.parametrize("n_layers", [1, 2])
def test_fused_streams_equal_the_per_stream_loop(n_layers):
    streams = [StreamConfig(**{**vars(s), "n_layers": n_layers}) for s in default_streams()]
    dm = make(2, streams=streams)
    assert dm.fuse_streams
    batch, length = 3, 21
    x = torch.randn(batch, length, 2, 16, requires_grad=True)
    resets = random_resets(batch, length)
    state0 = random_state(dm, batch)

    def run(fused: bool):
        dm.fuse_streams = fused
        w, alpha, state = dm(x, state0, resets)
        w_step, _, state_step = dm.step(x[:, 0], state0, resets[:, 0])
        grads = torch.autograd.grad(w.square().sum(), [x, *dm.parameters()])
        return w, alpha, state.flatten(), w_step, state_step.flatten(), grads

    for got, want in zip(run(True), run(False), strict=True):
        tol = 1e-4 if isinstance(got, tuple) else ATOL  # gradients: summed in other orders
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_streams_of_different_sizes_run_one_by_one():
    streams = default_streams()
    streams[1].d_state = 8
    dm = make(2, streams=streams)
    assert not dm.fuse_streams
    w, _, _ = dm(torch.randn(2, 5, 2, 16))
    assert w.shape == (2, 5, 8)
