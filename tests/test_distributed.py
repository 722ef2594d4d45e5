"""DistributedMamba: step == sequence, exact resets, competition, feedback, time scales;
clocked (multi-rate) streams and the episodic-memory stream."""

from __future__ import annotations

import math

import pytest
import torch

from tests.test_mamba2 import random_resets
from thalamus_rl import (
    DistributedMamba,
    StreamConfig,
    ThalamusConfig,
    ThalamusState,
    default_streams,
)
from thalamus_rl.distributed import EpisodicStream, MambaStream
from thalamus_rl.mamba2 import Mamba2State
from thalamus_rl.state import ClockedStreamState, EpisodicState

ATOL = 1e-5


def make(n_iterations: int = 2, **kw) -> DistributedMamba:
    torch.manual_seed(0)
    args = dict(d_model=16, streams=default_streams(), d_workspace=8, chunk_size=8, backend="pure")
    args.update(kw)
    return DistributedMamba(n_iterations=n_iterations, **args)


def random_state(dm: DistributedMamba, batch: int) -> ThalamusState:
    return random_valid_state(dm.initial_state(batch), seed=1)


def random_valid_state(state: ThalamusState, seed: int = 1) -> ThalamusState:
    """Every leaf random, except the counters (clock phases, store pointers: integers in
    range) and the store's occupancy (0/1), which must hold what a rollout can produce."""
    g = torch.Generator().manual_seed(seed)
    state = state.map(lambda t: torch.randn(t.shape, generator=g))

    def fix(s):
        if isinstance(s, ClockedStreamState):
            k = 1 + int(torch.randint(2, 6, (), generator=g))  # any range is fine for tests
            return s._replace(phase=torch.randint(0, k, s.phase.shape, generator=g).float())
        if isinstance(s, EpisodicState):
            cap = s.filled.shape[1]
            return s._replace(
                filled=(torch.rand(s.filled.shape, generator=g) < 0.7).float(),
                pointer=torch.randint(0, cap, s.pointer.shape, generator=g).float(),
            )
        return s

    mamba = tuple(tuple(fix(s) for s in it) for it in state.mamba)
    return state._replace(mamba=mamba)


def three_streams(clock: int = 3, capacity: int = 5) -> list[StreamConfig]:
    """visual, semantic with a clock, episodic (the issue-38 configuration, small)."""
    streams = default_streams()
    streams[1].clock = clock
    streams.append(StreamConfig(name="episodic", kind="episodic", capacity=capacity, headdim=8))
    return streams


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


# ---------------------------------------------------------------- clocked and episodic streams


def make_three(n_iterations: int = 2) -> DistributedMamba:
    return make(n_iterations, streams=three_streams(), chunk_size=4)


@pytest.mark.parametrize("n_iterations", [1, 2])
def test_three_streams_step_equals_forward_with_resets(n_iterations):
    dm = make_three(n_iterations)
    assert not dm.fuse_streams
    batch, length = 3, 23
    x = torch.randn(batch, length, 3, 16)
    resets = random_resets(batch, length)
    state0 = random_state(dm, batch)
    w, alpha, state = dm(x, state0, resets)
    s, ws, alphas = state0, [], []
    for t in range(length):
        wt, at, s = dm.step(x[:, t], s, resets[:, t])
        ws.append(wt)
        alphas.append(at)
    torch.testing.assert_close(torch.stack(ws, 1), w, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(torch.stack(alphas, 1), alpha, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s.flatten(), state.flatten(), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("t_reset", [0, 7, 22])
def test_three_streams_reset_equals_fresh_sequence(t_reset):
    dm = make_three()
    x = torch.randn(2, 23, 3, 16)
    resets = torch.zeros(2, 23, dtype=torch.bool)
    resets[:, t_reset] = True
    w, _, state = dm(x, random_state(dm, 2), resets)
    w_fresh, _, state_fresh = dm(x[:, t_reset:])
    torch.testing.assert_close(w[:, t_reset:], w_fresh, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.flatten(), state_fresh.flatten(), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("split", [1, 8, 13])
def test_three_streams_carrying_state_equals_one_call(split):
    dm = make_three()
    x = torch.randn(3, 30, 3, 16)
    resets = random_resets(3, 30, seed=2)
    state0 = random_state(dm, 3)
    w, _, state = dm(x, state0, resets)
    w1, _, s1 = dm(x[:, :split], state0, resets[:, :split])
    w2, _, s2 = dm(x[:, split:], s1, resets[:, split:])
    torch.testing.assert_close(torch.cat([w1, w2], 1), w, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s2.flatten(), state.flatten(), atol=ATOL, rtol=ATOL)


def make_stream(clock: int, n_layers: int = 2) -> MambaStream:
    torch.manual_seed(0)
    config = StreamConfig(name="slow", n_layers=n_layers, headdim=8, clock=clock)
    return MambaStream(16, config, chunk_size=4, backend="pure")


@pytest.mark.parametrize("phase0", [0, 2])
def test_clocked_stream_is_the_stack_on_the_subsampled_steps_held(phase0):
    """clock k == the same weights at clock 1 on x[:, first::k], each output held k steps:
    the conv's taps are the previous clocked inputs, not the skipped ones."""
    k, length = 3, 20
    slow = make_stream(k)
    plain = make_stream(1)
    plain.load_state_dict(slow.state_dict())
    x = torch.randn(2, length, 16)
    g = torch.Generator().manual_seed(5)
    layer_states = tuple(
        Mamba2State(torch.randn(s.conv.shape, generator=g), torch.randn(s.ssm.shape, generator=g))
        for s in plain.initial_state(2)
    )
    held0 = torch.randn(2, 16, generator=g)
    state0 = ClockedStreamState(layer_states, torch.full((2,), float(phase0)), held0)
    y, state = slow(x, state0, None)
    first = (k - phase0) % k
    y_sub, layers_sub = plain(x[:, first::k], layer_states, None)
    ticks = torch.arange(length)
    for t in range(length):
        want = held0 if t < first else y_sub[:, (t - first) // k]
        torch.testing.assert_close(y[:, t], want, atol=ATOL, rtol=ATOL)
    for got, want in zip(state.layers, layers_sub, strict=True):
        torch.testing.assert_close(got.conv, want.conv, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(got.ssm, want.ssm, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.phase, ((phase0 + length) % k) * torch.ones(2))
    # Inputs between ticks change nothing.
    off_tick = (ticks + phase0) % k != 0
    x_other = x.clone()
    x_other[:, off_tick] += 10.0
    y_other, state_other = slow(x_other, state0, None)
    torch.testing.assert_close(y_other, y)
    torch.testing.assert_close(state_other.held, state.held)


def test_clocked_stream_without_a_tick_in_the_call_holds_everything():
    slow = make_stream(4)
    state0 = slow.initial_state(2)._replace(phase=torch.ones(2), held=torch.randn(2, 16))
    y, state = slow(torch.randn(2, 3, 16), state0, None)  # phases 1, 2, 3: no tick
    torch.testing.assert_close(y, state0.held[:, None].expand(2, 3, 16))
    torch.testing.assert_close(state.phase, torch.zeros(2))
    for new, old in zip(state.layers, state0.layers, strict=True):
        torch.testing.assert_close(new.ssm, old.ssm)
        torch.testing.assert_close(new.conv, old.conv)


def make_episodic(capacity: int = 4) -> EpisodicStream:
    torch.manual_seed(0)
    return EpisodicStream(
        16, StreamConfig(name="memory", kind="episodic", capacity=capacity, headdim=8)
    )


def test_episodic_stream_is_a_causal_window_of_capacity_within_the_episode():
    """Against a direct reference: at step t, attention over the keys of the steps
    max(episode start, t - capacity + 1) .. t of the episode, nothing else."""
    capacity, length = 4, 15
    mem = make_episodic(capacity)
    x = torch.randn(2, length, 16)
    resets = torch.zeros(2, length, dtype=torch.bool)
    resets[0, 0] = resets[1, 6] = resets[1, 7] = True
    y, _ = mem(x, mem.initial_state(2), resets)
    query, key, value = mem._project(x)
    for b in range(2):
        start = 0
        for t in range(length):
            if resets[b, t]:
                start = t
            lo = max(start, t - capacity + 1)
            mask = torch.ones(1, 1, t + 1 - lo, dtype=torch.bool)
            want = mem._read(
                x[b : b + 1, t : t + 1],
                query[b : b + 1, t : t + 1],
                key[b : b + 1, lo : t + 1],
                value[b : b + 1, lo : t + 1],
                mask,
            )
            torch.testing.assert_close(y[b, t], want[0, 0], atol=ATOL, rtol=ATOL)


def test_episodic_store_is_fifo_bounded_and_cleared_at_an_episode_start():
    capacity, length = 4, 10
    mem = make_episodic(capacity)
    x = torch.randn(1, length, 16)
    _, state = mem(x, mem.initial_state(1), None)
    assert state.keys.shape == (1, capacity, 16)
    _, key, _ = mem._project(x)
    # Steps 6..9 remain; step t sits in slot t % capacity (the oldest was overwritten).
    for t in range(length - capacity, length):
        torch.testing.assert_close(state.keys[0, t % capacity], key[0, t])
    assert state.filled.eq(1).all() and state.pointer.item() == length % capacity
    # A reset at the last step leaves one entry, in slot 0.
    resets = torch.zeros(1, length, dtype=torch.bool)
    resets[0, -1] = True
    _, state = mem(x, mem.initial_state(1), resets)
    torch.testing.assert_close(state.filled, torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    torch.testing.assert_close(state.keys[0, 0], key[0, -1])
    assert state.keys[0, 1:].abs().sum() == 0 and state.pointer.item() == 1


def test_three_stream_state_pytree_methods():
    dm = make_three(2)
    state = random_state(dm, 5)
    flat = state.flatten()
    torch.testing.assert_close(state.unflatten(flat).flatten(), flat)
    torch.testing.assert_close(state.index(torch.tensor([1, 3])).flatten(), flat[[1, 3]])
    both = ThalamusState.cat([state.index(slice(0, 2)), state.index(slice(2, 5))])
    torch.testing.assert_close(both.flatten(), flat)
    masked = state.mask(torch.tensor([True, False, False, True, False]))
    assert masked.flatten()[[0, 3]].abs().sum() == 0  # phases, pointers, stores all restart
    torch.testing.assert_close(masked.flatten()[[1, 2, 4]], flat[[1, 2, 4]])
    kinds = [type(s) for s in state.mamba[0]]
    assert kinds == [tuple, ClockedStreamState, EpisodicState]
    # The default streams keep the clock-1 structure (and the stored state's layout).
    assert all(isinstance(s, tuple) and type(s) is tuple for s in make(2).initial_state(1).mamba[0])


def test_three_streams_gradients_reach_every_parameter():
    dm = make_three(2)
    w, alpha, _ = dm(torch.randn(2, 10, 3, 16), None, random_resets(2, 10))
    (w.square().mean() + alpha[..., 2].mean()).backward()
    for name, p in dm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_clocked_half_lives_count_env_steps():
    plain, slow = make_stream(1), make_stream(4)
    slow.load_state_dict(plain.state_dict())
    torch.testing.assert_close(slow.half_lives(), 4 * plain.half_lives())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"clock": 0}, "clock must be an int >= 1"),
        ({"clock": 1.5}, "clock must be an int >= 1"),
        ({"kind": "lstm"}, "kind='lstm' is not one of mamba, episodic"),
        ({"kind": "episodic", "capacity": 0}, "capacity must be an int >= 1"),
        ({"kind": "episodic", "clock": 2}, "episodic streams write every step"),
    ],
)
def test_bad_stream_kinds_clocks_and_capacities_are_named(change, match):
    streams = [{"name": "visual"}, {"name": "bad", **change}]
    with pytest.raises(ValueError, match=f"ThalamusConfig.streams.1.*{match}"):
        ThalamusConfig(streams=streams)
    with pytest.raises(ValueError, match=match):
        DistributedMamba(16, [StreamConfig(name="bad", **change)])


@pytest.mark.parametrize("streams", ["default", "three"])
@pytest.mark.parametrize("n_iterations", [1, 2])
def test_stream_hook_sees_every_iteration_and_changes_nothing(streams, n_iterations):
    dm = make(n_iterations) if streams == "default" else make_three(n_iterations)
    m = dm.n_streams
    batch, length = 2, 9
    x = torch.randn(batch, length, m, 16)
    resets = random_resets(batch, length)
    state0 = random_state(dm, batch)
    bare = dm(x, state0, resets)
    bare_step = dm.step(x[:, 0], state0, resets[:, 0])
    seen = []
    handle = dm.register_stream_hook(lambda it, u, y: seen.append((it, u.clone(), y.clone())))
    hooked = dm(x, state0, resets)
    hooked_step = dm.step(x[:, 0], state0, resets[:, 0])
    handle.remove()
    for a, b in ((bare, hooked), (bare_step, hooked_step)):
        torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
        torch.testing.assert_close(a[1], b[1], atol=0, rtol=0)
        torch.testing.assert_close(a[2].flatten(), b[2].flatten(), atol=0, rtol=0)
    assert [it for it, _, _ in seen] == [*range(n_iterations)] * 2  # forward, then step
    forward, step = seen[:n_iterations], seen[n_iterations:]
    assert forward[0][1].shape == forward[0][2].shape == (batch, length, m, 16)
    assert step[0][1].shape == step[0][2].shape == (batch, m, 16)
    torch.testing.assert_close(forward[0][1], x, atol=0, rtol=0)  # iteration 0 reads x
    torch.testing.assert_close(step[0][1], x[:, 0], atol=0, rtol=0)
    # The last iteration's outputs are the votes that, weighted by α, make the workspace.
    for (_, _, outputs), (workspace, alpha, _) in ((forward[-1], bare), (step[-1], bare_step)):
        votes = torch.stack([vote(outputs[..., i, :]) for i, vote in enumerate(dm.vote)], -2)
        mixed = dm.norm((alpha[..., None] * votes).sum(-2))
        torch.testing.assert_close(mixed, workspace, atol=ATOL, rtol=ATOL)
    dm(x, state0, resets)
    assert len(seen) == 2 * n_iterations  # removed: not called any more
