"""PhaseGate and FeedbackLayer: selection, gradients, masking, ties, phase tags, validation."""

from __future__ import annotations

import math

import pytest
import torch

from thalamus_rl.feedback import FeedbackLayer, FeedbackModulation, symlog
from thalamus_rl.gate import GateOutput, PhaseGate, salience_reference

D, D_TASK, N, K, P, N_FB = 32, 12, 20, 6, 4, 3


def make_gate(seed: int = 0, **kwargs) -> PhaseGate:
    torch.manual_seed(seed)
    cfg = dict(d_model=D, d_task=D_TASK, n_heads=4, top_k=K, phase_dim=P, n_feedback_signals=N_FB)
    cfg.update(kwargs)
    return PhaseGate(**cfg)


def make_inputs(batch: tuple[int, ...] = (5,), n: int = N, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(*batch, n, D, generator=g)
    task = torch.randn(*batch, D_TASK, generator=g)
    feedback = torch.randn(*batch, N_FB, generator=g) * 10.0
    positions = torch.randint(0, 7, (*batch, n, 2), generator=g).float()
    return tokens, task, feedback, positions


# ---------------------------------------------------------------- FeedbackLayer
def test_feedback_layer_starts_small_nonzero_and_every_param_gets_grad():
    torch.manual_seed(0)
    layer = FeedbackLayer(N_FB, D)
    signals = torch.tensor([[0.0, 3.0, -250.0], [1.0, 0.5, 1e6]])
    mod = layer(signals)
    assert isinstance(mod, FeedbackModulation)
    assert all(t.shape == (2, D) for t in mod)
    assert all(torch.isfinite(t).all() for t in mod)
    deviation = (mod.query_scale - 1.0).abs().max()
    assert 0.0 < deviation < 0.25, "query_scale should start close to, not at, 1"
    assert 0.0 < mod.bias_direction.abs().max() < 0.25
    assert 0.0 < layer.gain.item() < 1.0
    # tanh hidden units: |modulation| <= gain * (sum_i |W_out| + |b_out|) for any signal
    bound = layer.gain.item() * (layer.fc_out.weight.abs().sum(-1) + layer.fc_out.bias.abs())
    extreme = layer(torch.tensor([[1e30, -1e30, 1e30]]))
    raw = torch.cat((extreme.query_scale - 1.0, extreme.query_shift, extreme.bias_direction), -1)
    assert (raw.abs()[0] <= bound + 1e-6).all()
    (mod.query_scale.sum() + mod.query_shift.sum() + mod.bias_direction.square().sum()).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def test_symlog_squashes_and_is_odd():
    x = torch.tensor([-1e6, -3.0, 0.0, 0.5, 1e6])
    y = symlog(x)
    torch.testing.assert_close(y, -symlog(-x))
    assert y.abs().max() < 14.0
    torch.testing.assert_close(symlog(torch.tensor([math.e - 1.0])), torch.tensor([1.0]))


def test_feedback_layer_rejects_wrong_signal_count():
    with pytest.raises(ValueError, match="n_signals=3"):
        FeedbackLayer(3, D)(torch.zeros(2, 4))


# ---------------------------------------------------------------- gradients
@pytest.mark.parametrize("use_feedback", [True, False])
def test_scoring_params_get_grad_from_output_tokens(use_feedback: bool):
    gate = make_gate(use_feedback=use_feedback)
    tokens, task, feedback, positions = make_inputs()
    out = gate(tokens, task, feedback if use_feedback else None, positions=positions)
    target = torch.randn_like(out.tokens)
    (out.tokens * target).sum().backward()  # loss on the output tokens only
    for name in ("query_proj.weight", "query_proj.bias", "key_proj.weight"):
        grad = gate.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, f"{name} got no gradient"
    if use_feedback:
        assert gate.feedback_layer is not None
        for name, p in gate.feedback_layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"feedback {name} got no grad"
    else:
        assert gate.feedback_layer is None
        assert not any("feedback" in name for name, _ in gate.named_parameters())


def test_phase_params_get_grad_from_phase_tags():
    gate = make_gate()
    tokens, task, feedback, positions = make_inputs()
    out = gate(tokens, task, feedback, positions=positions)
    (out.phase * torch.randn_like(out.phase)).sum().backward()
    for name in ("phase_proj.weight", "phase_freq"):
        assert gate.get_parameter(name).grad.abs().sum() > 0, name


# ---------------------------------------------------------------- conditioning
def test_task_vector_changes_selection():
    gate = make_gate()
    tokens, task, feedback, _ = make_inputs(batch=(8,))
    a = gate(tokens, task, feedback)
    b = gate(tokens, torch.randn(task.shape, generator=torch.Generator().manual_seed(9)), feedback)
    changed = [set(a.indices[i].tolist()) != set(b.indices[i].tolist()) for i in range(8)]
    assert sum(changed) >= 6, "a new task vector should select different tokens"


@pytest.mark.parametrize("use_feedback", [True, False])
def test_reward_signals_change_salience_only_when_feedback_on(use_feedback: bool):
    gate = make_gate(use_feedback=use_feedback)
    tokens, task, feedback, _ = make_inputs()
    a = gate(tokens, task, feedback)
    b = gate(tokens, task, feedback + 5.0)
    if use_feedback:  # both the query (scale/shift) and the per-token bias move
        assert (a.salience - b.salience).abs().max() > 1e-3
        assert (a.query - b.query).abs().max() > 1e-4
    else:
        torch.testing.assert_close(a.salience, b.salience, rtol=0, atol=0)
        torch.testing.assert_close(a.query, b.query, rtol=0, atol=0)


def test_feedback_required_when_on():
    gate = make_gate()
    tokens, task, _, _ = make_inputs()
    with pytest.raises(ValueError, match="use_feedback=True but feedback=None"):
        gate(tokens, task)


# ---------------------------------------------------------------- salience
@pytest.mark.parametrize("use_feedback", [True, False])
def test_salience_matches_naive_per_head_keys(use_feedback: bool):
    gate = make_gate(use_feedback=use_feedback)
    tokens, task, feedback, _ = make_inputs(batch=(3, 4))
    mask = torch.rand(3, 4, N, generator=torch.Generator().manual_seed(3)) < 0.7
    mask[..., 0] = True
    out = gate(tokens, task, feedback, mask=mask)
    bias_dir = gate.feedback_layer(feedback).bias_direction if use_feedback else None
    ref = salience_reference(tokens, out.query, gate.key_proj.weight, gate.n_heads, bias_dir, mask)
    torch.testing.assert_close(out.salience, ref, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(out.salience[~mask]).all()


def test_entropy_of_salience():
    s = torch.tensor([[0.0, 0.0, 0.0, float("-inf")], [5.0, 1.0, -2.0, 0.5]])
    mask = torch.tensor([[True, True, True, False], [True, False, True, True]])
    ent = PhaseGate.entropy(s, mask)
    torch.testing.assert_close(ent[0], torch.tensor(math.log(3.0)))
    p = torch.softmax(torch.tensor([5.0, -2.0, 0.5]), -1)
    torch.testing.assert_close(ent[1], -(p * p.log()).sum())
    torch.testing.assert_close(PhaseGate.entropy(s[:1], None), ent[:1])


# ---------------------------------------------------------------- top-K and masks
def test_masked_tokens_never_selected_random_masks():
    gate = make_gate()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        tokens, task, feedback, _ = make_inputs(batch=(6,), seed=seed)
        mask = torch.rand(6, N, generator=g) < torch.rand(6, 1, generator=g)
        mask[torch.arange(6), torch.randint(0, N, (6,), generator=g)] = True  # >= 1 valid
        out = gate(tokens, task, feedback, mask=mask)
        n_valid = mask.sum(-1)
        assert torch.equal(out.kept_mask.sum(-1), n_valid.clamp(max=K))
        chosen_valid = mask.gather(-1, out.indices)
        assert chosen_valid[out.kept_mask].all(), f"seed {seed}: a masked token was kept"
        assert (out.weights[~out.kept_mask] == 0).all()
        assert (out.tokens[~out.kept_mask] == 0).all()
        for i in range(6):  # the kept set is the top of the valid saliences
            kept = out.indices[i][out.kept_mask[i]]
            expected = out.salience[i].topk(int(n_valid[i].clamp(max=K))).values
            torch.testing.assert_close(out.salience[i][kept], expected)


def test_k_larger_than_valid_and_than_n():
    gate = make_gate(top_k=8)
    tokens, task, feedback, _ = make_inputs(batch=(2,), n=5)
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    out = gate(tokens, task, feedback, mask=mask)
    assert out.tokens.shape == (2, 8, D) and out.indices.shape == (2, 8)
    assert out.kept_mask.tolist() == [[True] * 3 + [False] * 5, [True] * 5 + [False] * 3]
    assert set(out.indices[0, :3].tolist()) == {0, 2, 3}
    assert set(out.indices[1, :5].tolist()) == set(range(5))
    assert ((out.indices >= 0) & (out.indices < 5)).all()
    torch.testing.assert_close(out.weights.sum(-1), torch.tensor([3.0, 5.0]))
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.phase).all()


def test_all_masked_row_raises():
    gate = make_gate()
    tokens, task, feedback, _ = make_inputs(batch=(3,))
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"batch row \[1\] has no valid token"):
        gate(tokens, task, feedback, mask=mask)


def test_ties_broken_by_lowest_index():
    gate = make_gate()
    _, task, feedback, _ = make_inputs(batch=(2,))
    tokens = torch.randn(D).expand(2, N, D).clone()  # all tokens identical
    out = gate(tokens, task, feedback)
    assert out.indices.tolist() == [list(range(K))] * 2
    # two groups of identical tokens: the better group first, each group by index
    a, b = torch.randn(D), torch.randn(D)
    tokens = torch.stack([a if j % 3 == 0 else b for j in range(N)]).expand(2, N, D).clone()
    out = gate(tokens, task, feedback)
    for i in range(2):
        s_a, s_b = out.salience[i, 0], out.salience[i, 1]
        first = [j for j in range(N) if (j % 3 == 0) == bool(s_a > s_b)]
        second = [j for j in range(N) if (j % 3 == 0) != bool(s_a > s_b)]
        assert out.indices[i].tolist() == (first + second)[:K]
    # masked identical tokens are skipped, the rest still by index
    mask = torch.ones(2, N, dtype=torch.bool)
    mask[:, :3] = False
    out = gate(torch.randn(D).expand(2, N, D).clone(), task, feedback, mask=mask)
    assert out.indices.tolist() == [list(range(3, 3 + K))] * 2


def test_weights_follow_salience_and_average_one():
    gate = make_gate()
    tokens, task, feedback, _ = make_inputs(batch=(4,))
    out = gate(tokens, task, feedback)
    s_kept = out.salience.gather(-1, out.indices)
    torch.testing.assert_close(out.weights, K * torch.softmax(s_kept, -1))
    torch.testing.assert_close(out.weights.mean(-1), torch.ones(4))
    expected_tokens = tokens.gather(1, out.indices[..., None].expand(-1, -1, D))
    torch.testing.assert_close(out.tokens, expected_tokens * out.weights[..., None])
    assert (s_kept.diff(dim=-1) <= 0).all()


# ---------------------------------------------------------------- gate off
def test_gate_disabled_keeps_all_tokens_in_order():
    gate = make_gate(enabled=False)
    tokens, task, feedback, positions = make_inputs(batch=(3,))
    out = gate(tokens, task, feedback, positions=positions)
    torch.testing.assert_close(out.tokens, tokens, rtol=0, atol=0)
    assert out.indices.tolist() == [list(range(N))] * 3
    assert (out.weights == 1).all() and out.kept_mask.all()
    assert out.phase.shape == (3, N, 2 * P)
    mask = torch.ones(3, N, dtype=torch.bool)
    mask[0, 4] = False
    out = gate(tokens, task, feedback, mask=mask, positions=positions)
    assert torch.equal(out.kept_mask, mask) and out.weights[0, 4] == 0
    assert (out.tokens[0, 4] == 0).all()


# ---------------------------------------------------------------- phase tags
def test_phase_tag_similarity_is_mean_cos_of_angle_differences():
    gate = make_gate()
    tokens, _, _, positions = make_inputs(batch=(2,))
    theta = gate.phase_angles(tokens, positions)  # [2, N, P]
    tags = PhaseGate.phase_tags(theta)
    sim = tags @ tags.transpose(-1, -2) / P
    mean_cos = torch.cos(theta[:, :, None, :] - theta[:, None, :, :]).mean(-1)
    torch.testing.assert_close(sim, mean_cos, rtol=1e-5, atol=1e-5)


def test_phase_tags_of_kept_tokens_use_content_and_position():
    gate = make_gate()
    tokens, task, feedback, positions = make_inputs(batch=(2,))
    out = gate(tokens, task, feedback, positions=positions)
    theta = gate.phase_angles(tokens, positions).gather(1, out.indices[..., None].expand(-1, -1, P))
    torch.testing.assert_close(out.phase, PhaseGate.phase_tags(theta))
    shifted = gate(tokens, task, feedback, positions=positions + 1.0)
    assert torch.equal(shifted.indices, out.indices)  # position does not change salience
    assert (shifted.phase - out.phase).abs().max() > 1e-3  # ... but changes the phase


# ---------------------------------------------------------------- batch dims
def test_leading_dims_bt_equal_flat():
    gate = make_gate()
    tokens, task, feedback, positions = make_inputs(batch=(3, 4))
    mask = torch.rand(3, 4, N, generator=torch.Generator().manual_seed(5)) < 0.8
    mask[..., 2] = True
    bt = gate(tokens, task, feedback, mask=mask, positions=positions)
    flat = gate(
        tokens.flatten(0, 1), task.flatten(0, 1), feedback.flatten(0, 1),
        mask=mask.flatten(0, 1), positions=positions.flatten(0, 1),
    )  # fmt: skip
    assert isinstance(bt, GateOutput)
    for name, x, y in zip(GateOutput._fields, bt, flat, strict=True):
        assert x.shape[:2] == (3, 4), name
        torch.testing.assert_close(x.flatten(0, 1), y, rtol=1e-6, atol=1e-6, msg=name)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda a: a.update(tokens=torch.randn(5, N, D + 1)), "d_model=32"),
        (lambda a: a.update(tokens=torch.randn(D)), r"\[\*, N>0, d_model"),
        (lambda a: a.update(task=torch.randn(5, D_TASK + 2)), "task must have shape"),
        (lambda a: a.update(task=torch.randn(4, D_TASK)), "task must have shape"),
        (lambda a: a.update(feedback=torch.randn(5, N_FB + 1)), "feedback must have shape"),
        (lambda a: a.update(mask=torch.ones(5, N)), "mask must be a bool"),
        (lambda a: a.update(mask=torch.ones(5, N + 1, dtype=torch.bool)), "mask must be a bool"),
        (lambda a: a.update(positions=torch.zeros(5, N, 3)), "positions must have shape"),
        (lambda a: a["tokens"].__setitem__((0, 1, 2), float("nan")), "tokens contains NaN"),
        (lambda a: a["task"].__setitem__((1, 0), float("inf")), "task contains NaN"),
        (lambda a: a["feedback"].__setitem__((2, 1), float("nan")), "feedback contains NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match):
    gate = make_gate()
    tokens, task, feedback, positions = make_inputs()
    args = dict(tokens=tokens, task=task, feedback=feedback, positions=positions)
    change(args)
    with pytest.raises(ValueError, match=match):
        gate(**args)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        PhaseGate(d_model=30, d_task=4, n_heads=4)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        PhaseGate(d_model=32, d_task=4, top_k=0)


def test_rest_summary_is_the_dropped_tokens_probability_mass():
    gate = make_gate(top_k=4)
    tokens, task, feedback, positions = make_inputs()
    mask = torch.rand(tokens.shape[:-1], generator=torch.Generator().manual_seed(2)) < 0.8
    mask[..., 0] = True
    out = gate(tokens, task, feedback, mask, positions)
    p = torch.softmax(out.salience, dim=-1)
    dropped = mask.clone()
    dropped.scatter_(-1, out.indices, False)
    expected = (p * dropped).unsqueeze(-1).mul(tokens).sum(-2)
    torch.testing.assert_close(out.rest, expected)


def test_dropped_tokens_get_salience_gradient_through_the_rest_summary():
    """Without the summary a token outside the top K gets no gradient and can never rise."""
    gate = make_gate(top_k=4)
    tokens, task, feedback, positions = make_inputs()
    mask = torch.rand(tokens.shape[:-1], generator=torch.Generator().manual_seed(2)) < 0.8
    mask[..., 0] = True
    tokens.requires_grad_(True)
    captured = {}
    score = gate.salience

    def salience_kept_for_grad(*args):
        captured["s"] = s = score(*args)
        s.retain_grad()
        return s

    gate.salience = salience_kept_for_grad
    out = gate(tokens, task, feedback, mask, positions)
    dropped = mask.clone()
    dropped.scatter_(-1, out.indices, False)
    out.rest.square().sum().backward()
    assert dropped.any()
    assert (captured["s"].grad[dropped] != 0).all()


def test_rest_summary_is_zero_when_nothing_is_dropped():
    tokens, task, feedback, positions = make_inputs()
    mask = torch.rand(tokens.shape[:-1], generator=torch.Generator().manual_seed(2)) < 0.8
    mask[..., 0] = True
    off = make_gate(enabled=False)(tokens, task, feedback, mask, positions)
    assert off.rest.abs().sum() == 0
    keep_all = make_gate(top_k=N)(tokens, task, feedback, None, positions)
    torch.testing.assert_close(keep_all.rest, torch.zeros_like(keep_all.rest))
