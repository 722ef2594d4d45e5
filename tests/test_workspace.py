"""PhaseWorkspace: phase-biased attention, masking, batch dims, and the gate -> workspace path."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from thalamus_rl.gate import PhaseGate
from thalamus_rl.workspace import PhaseWorkspace

D, H, K, P = 32, 4, 7, 5


def make_workspace(seed: int = 0, **kwargs) -> PhaseWorkspace:
    torch.manual_seed(seed)
    cfg = dict(d_model=D, n_heads=H, n_layers=2, phase_dim=P)
    cfg.update(kwargs)
    return PhaseWorkspace(**cfg)


def make_inputs(batch: tuple[int, ...] = (4,), seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(*batch, K, D, generator=g)
    theta = torch.rand(*batch, K, P, generator=g) * 2 * math.pi
    phase = torch.cat((theta.cos(), theta.sin()), -1)
    mask = torch.rand(*batch, K, generator=g) < 0.7
    mask[..., 0] = True
    return tokens, phase, mask


def set_phase_scale_zero(ws: PhaseWorkspace) -> None:
    with torch.no_grad():
        ws.phase_scale_raw.fill_(-1e4)  # softplus(-1e4) == 0 exactly in float32
    assert (ws.phase_scale == 0).all()


def test_phase_scale_is_nonnegative_per_head_and_learnable():
    ws = make_workspace()
    assert ws.phase_scale.shape == (H,)
    torch.testing.assert_close(ws.phase_scale, torch.ones(H))
    with torch.no_grad():
        ws.phase_scale_raw.copy_(torch.tensor([-50.0, -1.0, 0.0, 3.0]))
    assert (ws.phase_scale >= 0).all()
    tokens, phase, mask = make_inputs()
    ws(tokens, phase, mask).square().sum().backward()
    assert ws.phase_scale_raw.grad is not None and ws.phase_scale_raw.grad[1:].abs().min() > 0


def test_lambda_zero_equals_pytorch_pre_ln_transformer():
    ws = make_workspace()
    set_phase_scale_zero(ws)
    ref_layers = []
    for block in ws.layers:
        ref = nn.TransformerEncoderLayer(
            D, H, dim_feedforward=ws.d_hidden, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        with torch.no_grad():
            ref.self_attn.in_proj_weight.copy_(block.qkv.weight)
            ref.self_attn.in_proj_bias.copy_(block.qkv.bias)
            ref.self_attn.out_proj.weight.copy_(block.out_proj.weight)
            ref.self_attn.out_proj.bias.copy_(block.out_proj.bias)
            norm2, fc1, _, fc2 = block.mlp
            for mine, theirs in ((block.norm1, ref.norm1), (norm2, ref.norm2)):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
            for mine, theirs in ((fc1, ref.linear1), (fc2, ref.linear2)):
                theirs.weight.copy_(mine.weight)
                theirs.bias.copy_(mine.bias)
        ref_layers.append(ref.train())  # train mode: no fused fast path, dropout is 0 anyway
    tokens, phase, mask = make_inputs()
    expected = tokens
    for ref in ref_layers:
        expected = ref(expected, src_key_padding_mask=~mask)
    out = ws(tokens, phase, mask)
    torch.testing.assert_close(out[mask], expected[mask], rtol=1e-5, atol=1e-5)
    # with lambda = 0 the phase tags are irrelevant
    torch.testing.assert_close(ws(tokens, torch.randn_like(phase), mask), out)


def test_positive_lambda_raises_attention_between_in_phase_tokens():
    ws = make_workspace(n_layers=1)
    tokens, _, _ = make_inputs(batch=(3,))
    base = torch.rand(3, 1, P) * 2 * math.pi
    in_phase = torch.tensor([True, True, True, False, False, False, False])
    theta = base + torch.where(in_phase, 0.0, math.pi)[None, :, None]  # others in anti-phase
    phase = torch.cat((theta.cos(), theta.sin()), -1)
    _, probs_on = ws.attention_probs(tokens, phase)  # lambda = 1 at init
    set_phase_scale_zero(ws)
    _, probs_off = ws.attention_probs(tokens, phase)
    # attention mass from in-phase queries onto in-phase keys, per batch row and head
    mass_on = probs_on[:, 0][:, :, in_phase][..., in_phase].sum(-1)
    mass_off = probs_off[:, 0][:, :, in_phase][..., in_phase].sum(-1)
    assert (mass_on > mass_off).all()
    # and the raise grows with lambda
    with torch.no_grad():
        ws.phase_scale_raw.fill_(5.0)
    mass_big = ws.attention_probs(tokens, phase)[1][:, 0][:, :, in_phase][..., in_phase].sum(-1)
    assert (mass_big > mass_on).all()


def test_attention_logits_are_qk_plus_lambda_mean_cos():
    ws = make_workspace(n_layers=1)
    with torch.no_grad():
        ws.phase_scale_raw.copy_(torch.tensor([-2.0, 0.0, 0.7, 2.0]))
    tokens, _, _ = make_inputs(batch=(2,))
    theta = torch.rand(2, K, P) * 2 * math.pi
    phase = torch.cat((theta.cos(), theta.sin()), -1)
    _, probs = ws.attention_probs(tokens, phase)
    q, k, _ = ws.layers[0]._qkv(tokens)  # [2, H, K, d_h]
    mean_cos = torch.cos(theta[:, :, None, :] - theta[:, None, :, :]).mean(-1)  # [2, K, K]
    logits = q @ k.transpose(-1, -2) / math.sqrt(D // H)
    logits = logits + ws.phase_scale[:, None, None] * mean_cos[:, None]
    torch.testing.assert_close(probs[:, 0], torch.softmax(logits, -1), rtol=1e-5, atol=1e-6)


def test_sdpa_forward_matches_explicit_reference():
    ws = make_workspace()
    tokens, phase, mask = make_inputs(batch=(2, 3))
    out = ws(tokens, phase, mask)
    ref, probs = ws.attention_probs(tokens, phase, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert probs.shape == (2, 3, 2, H, K, K)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 2, H, K))
    assert (probs.masked_select(~mask[:, :, None, None, None, :]) == 0).all()


def test_batches_over_the_sdpa_limit_run_in_slices_with_the_same_result(monkeypatch):
    """Batches above SDPA_MAX_BATCH (65535: PyTorch's CUDA efficient-attention backward breaks
    there) are cut into slices; forward and gradients equal the one-call result."""
    import thalamus_rl.workspace as workspace_module

    monkeypatch.setattr(workspace_module, "EXPLICIT_CPU_ATTENTION", False)  # SDPA on CPU too
    ws = make_workspace()
    tokens, phase, mask = make_inputs(batch=(10,))

    def run():
        x = tokens.clone().requires_grad_(True)
        out = ws(x, phase, mask)
        grads = torch.autograd.grad(out.square().sum(), [x, *ws.parameters()])
        return out, grads

    whole, whole_grads = run()
    calls = []
    real_sdpa = workspace_module.F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(workspace_module, "SDPA_MAX_BATCH", 4)
    monkeypatch.setattr(workspace_module.F, "scaled_dot_product_attention", counting_sdpa)
    sliced, sliced_grads = run()
    assert calls == [4, 4, 2] * 2  # two layers, 10 rows in slices of 4
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-6)
    for a, b in zip(sliced_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_masked_slots_do_not_influence_valid_outputs():
    ws = make_workspace()
    tokens, phase, mask = make_inputs(batch=(6,))
    out = ws(tokens, phase, mask)
    g = torch.Generator().manual_seed(7)
    tokens2 = torch.where(mask[..., None], tokens, 100 * torch.randn(tokens.shape, generator=g))
    phase2 = torch.where(mask[..., None], phase, torch.randn(phase.shape, generator=g))
    out2 = ws(tokens2, phase2, mask)
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    assert (out[~mask] == 0).all()


def test_row_without_valid_slot_gives_finite_output():
    ws = make_workspace()
    tokens, phase, mask = make_inputs(batch=(3,))
    mask[1] = False
    out = ws(tokens, phase, mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ws.parameters() if p.grad is not None)


def test_leading_dims_bt_equal_flat():
    ws = make_workspace()
    tokens, phase, mask = make_inputs(batch=(3, 5))
    bt = ws(tokens, phase, mask)
    flat = ws(tokens.flatten(0, 1), phase.flatten(0, 1), mask.flatten(0, 1))
    assert bt.shape == (3, 5, K, D)
    torch.testing.assert_close(bt.flatten(0, 1), flat, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ws(tokens, phase), ws(tokens, phase, torch.ones_like(mask)))


def test_gate_to_workspace_end_to_end_gradients():
    torch.manual_seed(0)
    gate = PhaseGate(d_model=D, d_task=6, n_heads=H, top_k=K, phase_dim=P)
    ws = PhaseWorkspace(D, H, n_layers=1, phase_dim=P)
    tokens = torch.randn(2, 3, 12, D)
    mask = torch.rand(2, 3, 12) < 0.4
    mask[..., 0] = True  # some rows have fewer than K valid tokens
    out = gate(tokens, torch.randn(2, 3, 6), torch.randn(2, 3, 3), mask, torch.rand(2, 3, 12, 2))
    y = ws(out.tokens, out.phase, out.kept_mask)
    assert y.shape == (2, 3, K, D) and torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    for name in ("query_proj.weight", "key_proj.weight", "phase_proj.weight", "phase_freq"):
        assert gate.get_parameter(name).grad.abs().sum() > 0, name
    assert ws.phase_scale_raw.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tokens=torch.randn(2, K, D + 1)), "d_model=32"),
        (dict(phase=torch.randn(2, K, P)), "phase must have shape"),
        (dict(phase=torch.randn(3, K, 2 * P)), "phase must have shape"),
        (dict(mask=torch.ones(2, K)), "mask must be a bool"),
        (dict(mask=torch.ones(2, K - 1, dtype=torch.bool)), "mask must be a bool"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, match):
    ws = make_workspace()
    args = dict(tokens=torch.randn(2, K, D), phase=torch.randn(2, K, 2 * P), mask=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ws(**args)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="divisible by n_heads"):
        PhaseWorkspace(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="n_layers must be a positive int"):
        PhaseWorkspace(d_model=32, n_layers=0)


def test_attention_only_workspace_without_mlp():
    """mlp_ratio=0: each layer is x + Attn(LN(x)) only (the cheaper setting)."""
    torch.manual_seed(0)
    ws = PhaseWorkspace(D, n_heads=H, phase_dim=P, mlp_ratio=0.0)
    assert ws.layers[0].mlp is None
    tokens, phase, mask = make_inputs()
    y, _ = ws.attention_probs(tokens, phase, mask)
    torch.testing.assert_close(ws(tokens, phase, mask), y, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mlp_ratio"):
        PhaseWorkspace(D, n_heads=H, phase_dim=P, mlp_ratio=-1.0)


def test_cpu_training_path_is_explicit_and_equals_sdpa(monkeypatch):
    """On CPU under autograd the layers skip SDPA (an explicit softmax, cheaper backward);
    outputs and every gradient equal the SDPA path, and without autograd SDPA still runs."""
    import thalamus_rl.workspace as workspace_module

    ws = make_workspace()
    tokens, phase, mask = make_inputs(batch=(6,))
    calls = []
    real_sdpa = workspace_module.F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(workspace_module.F, "scaled_dot_product_attention", counting_sdpa)

    def run():
        x = tokens.clone().requires_grad_(True)
        p = phase.clone().requires_grad_(True)
        out = ws(x, p, mask)
        grads = torch.autograd.grad(out.square().sum(), [x, p, *ws.parameters()])
        return out, grads

    explicit, explicit_grads = run()
    assert calls == []
    with torch.no_grad():
        ws(tokens, phase, mask)
    assert calls == [6] * ws.n_layers
    monkeypatch.setattr(workspace_module, "EXPLICIT_CPU_ATTENTION", False)
    sdpa, sdpa_grads = run()
    torch.testing.assert_close(explicit, sdpa, rtol=1e-5, atol=1e-5)
    for a, b in zip(explicit_grads, sdpa_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
