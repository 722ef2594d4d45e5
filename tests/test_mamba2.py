"""Mamba2Block and the SSD scan: reference vs chunked, step vs sequence, exact resets."""

from __future__ import annotations

import pytest
import torch

from thalamus_rl import Mamba2Block
from thalamus_rl.mamba2 import blocks_fusable, mamba2_forward_multi, mamba2_step_multi
from thalamus_rl.ssd import ssd_scan_chunked, ssd_scan_reference

ATOL = 1e-5


def random_resets(batch: int, length: int, p: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Random episode starts, with a reset at t=0 and back-to-back resets forced in."""
    g = torch.Generator().manual_seed(seed)
    resets = torch.rand(batch, length, generator=g) < p
    resets[0, 0] = True
    if length > 4 and batch > 1:
        resets[1, 3] = resets[1, 4] = True
    return resets


def random_state(block: Mamba2Block, batch: int):
    s = block.initial_state(batch)
    return s._replace(conv=torch.randn_like(s.conv), ssm=torch.randn_like(s.ssm))


def ssd_inputs(batch, length, nheads, headdim, ngroups, d_state, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, nheads, headdim, generator=g, dtype=dtype)
    dA = -torch.rand(batch, length, nheads, generator=g, dtype=dtype) * 1.5
    B = torch.randn(batch, length, ngroups, d_state, generator=g, dtype=dtype)
    C = torch.randn(batch, length, ngroups, d_state, generator=g, dtype=dtype)
    h0 = torch.randn(batch, nheads, headdim, d_state, generator=g, dtype=dtype)
    return x, dA, B, C, h0


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("with_resets", [False, True])
def test_chunked_ssd_matches_float64_reference(chunk_size, with_resets):
    # T = 45 is not a multiple of any chunk size above 1.
    x, dA, B, C, h0 = ssd_inputs(3, 45, 4, 6, 2, 5)
    resets = random_resets(3, 45) if with_resets else None
    y_ref, s_ref = ssd_scan_reference(x, dA, B, C, h0, resets)
    y, s = ssd_scan_chunked(
        x.float(), dA.float(), B.float(), C.float(), h0.float(), resets, chunk_size
    )
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s.double(), s_ref, atol=ATOL, rtol=ATOL)


def test_chunked_ssd_stable_with_strong_decay():
    # Long chunks of strong decay: cumulative sums of -1e3 must not cancel into garbage.
    x, dA, B, C, h0 = ssd_inputs(2, 128, 2, 4, 1, 3)
    dA = dA * 20.0
    y_ref, _ = ssd_scan_reference(x, dA, B, C, h0)
    y, _ = ssd_scan_chunked(x.float(), dA.float(), B.float(), C.float(), h0.float(), chunk_size=128)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, atol=ATOL, rtol=ATOL)


def make_block(**kw) -> Mamba2Block:
    torch.manual_seed(0)
    args = dict(d_model=16, d_state=8, headdim=8, chunk_size=8, backend="pure")
    args.update(kw)
    return Mamba2Block(**args)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_step_equals_forward_with_resets(ngroups):
    block = make_block(ngroups=ngroups)
    batch, length = 3, 29
    x = torch.randn(batch, length, 16)
    resets = random_resets(batch, length)
    state0 = random_state(block, batch)
    y, state = block(x, state0, resets)
    s = state0
    ys = []
    for t in range(length):
        yt, s = block.step(x[:, t], s, resets[:, t])
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s.ssm, state.ssm, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s.conv, state.conv, atol=ATOL, rtol=ATOL)


def test_trailing_padding_past_n_valid_leaves_the_state_alone():
    """``n_valid[b]``: row b's later steps are padding (clocked streams); the outputs of the
    real steps and the final state equal a run on the real steps only."""
    block = make_block()
    x = torch.randn(3, 13, 16)
    resets = random_resets(3, 13)
    state0 = random_state(block, 3)
    n_valid = torch.tensor([13, 6, 0])
    y, state = block(x, state0, resets, n_valid)
    for b, n in enumerate(n_valid.tolist()):
        row = state0._replace(conv=state0.conv[b : b + 1], ssm=state0.ssm[b : b + 1])
        if n == 0:
            want_y, want = x[b : b + 1, :0], row
        else:
            want_y, want = block(x[b : b + 1, :n], row, resets[b : b + 1, :n])
        torch.testing.assert_close(y[b : b + 1, :n], want_y, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(state.ssm[b : b + 1], want.ssm, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(state.conv[b : b + 1], want.conv, atol=ATOL, rtol=ATOL)


def test_pure_forward_matches_naive_reference_float64():
    """The whole block in float64 against a per-step loop of the same maths."""
    block = make_block().double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    resets = random_resets(2, 20)
    y, _ = block(x, None, resets)
    s = None
    ys = []
    for t in range(20):
        yt, s = block.step(x[:, t], s, resets[:, t])
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("t_reset", [0, 1, 7, 19])
def test_reset_equals_fresh_sequence(t_reset):
    block = make_block()
    batch, length = 2, 20
    x = torch.randn(batch, length, 16)
    resets = torch.zeros(batch, length, dtype=torch.bool)
    resets[:, t_reset] = True
    y, state = block(x, random_state(block, batch), resets)
    y_fresh, state_fresh = block(x[:, t_reset:])
    torch.testing.assert_close(y[:, t_reset:], y_fresh, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.ssm, state_fresh.ssm, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.conv, state_fresh.conv, atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("split", [1, 3, 8, 17])
def test_carrying_state_equals_one_call(split):
    block = make_block()
    x = torch.randn(3, 24, 16)
    resets = random_resets(3, 24, seed=1)
    state0 = random_state(block, 3)
    y, state = block(x, state0, resets)
    y1, s1 = block(x[:, :split], state0, resets[:, :split])
    y2, s2 = block(x[:, split:], s1, resets[:, split:])
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(s2.ssm, state.ssm, atol=ATOL, rtol=ATOL)


def test_no_nan_with_large_dt_and_long_sequence():
    block = make_block(dt_min=5.0, dt_max=50.0, A_init_range=(1.0, 16.0), chunk_size=64)
    x = torch.randn(2, 1024, 16, requires_grad=True)
    y, state = block(x, None, random_resets(2, 1024, p=0.01))
    y.square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(state.ssm).all()
    assert torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_gradients_reach_every_parameter():
    block = make_block()
    y, _ = block(torch.randn(2, 12, 16))
    y.sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_parameter_names_and_shapes_match_mamba_ssm_mamba2():
    """The state_dict layout of mamba-ssm's Mamba2 (rmsnorm, no bias, conv bias, D per head)."""
    d_model, d_state, d_conv, expand, headdim, ngroups = 32, 16, 4, 2, 16, 2
    block = Mamba2Block(d_model, d_state, d_conv, expand, headdim, ngroups)
    d_inner = expand * d_model
    nheads = d_inner // headdim
    conv_dim = d_inner + 2 * ngroups * d_state
    expected = {
        "in_proj.weight": (2 * d_inner + 2 * ngroups * d_state + nheads, d_model),
        "conv1d.weight": (conv_dim, 1, d_conv),
        "conv1d.bias": (conv_dim,),
        "dt_bias": (nheads,),
        "A_log": (nheads,),
        "D": (nheads,),
        "norm.weight": (d_inner,),
        "out_proj.weight": (d_model, d_inner),
    }
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == expected


def test_initial_dt_and_A_ranges():
    block = Mamba2Block(64, headdim=16, dt_min=0.01, dt_max=0.05, A_init_range=(2.0, 3.0))
    dt = torch.nn.functional.softplus(block.dt_bias)
    assert (dt >= 0.01 - 1e-6).all() and (dt <= 0.05 + 1e-6).all()
    A = block.A_log.exp()
    assert (A >= 2.0).all() and (A <= 3.0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=10, headdim=8), "divisible by headdim"),
        (dict(d_model=16, headdim=8, ngroups=3), "divisible by ngroups"),
        (dict(d_model=16, backend="cuda"), "unknown backend"),
        (dict(d_model=16, dt_min=0.5, dt_max=0.1), "dt_min"),
    ],
)
def test_bad_construction_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Block(**kwargs)


def test_bad_input_shapes_raise():
    block = make_block()
    with pytest.raises(ValueError, match="d_model=16"):
        block(torch.randn(2, 5, 15))
    with pytest.raises(ValueError, match=r"\[B, d_model\]"):
        block.step(torch.randn(2, 5, 16))
    with pytest.raises(ValueError, match="episode_starts"):
        block(torch.randn(2, 5, 16), None, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="batch size"):
        block(torch.randn(2, 5, 16), block.initial_state(3))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_kernel_backend_without_cuda_says_what_to_do():
    block = make_block(backend="kernel")
    with pytest.raises(RuntimeError, match="backend='pure'"):
        block(torch.randn(1, 4, 16))


def test_backend_choice(monkeypatch):
    import thalamus_rl.mamba2 as mamba2

    rows = mamba2.AUTO_KERNEL_MIN_ROWS
    assert not mamba2.use_kernel_path("pure", 10 * rows, on_cuda=True)
    assert not mamba2.use_kernel_path("auto", 10 * rows, on_cuda=False)
    with pytest.raises(RuntimeError, match="backend='pure'/'auto'"):
        mamba2.use_kernel_path("kernel", 1, on_cuda=False)
    monkeypatch.setattr(mamba2, "kernels_available", lambda: True)
    # auto: the kernels only pay for long inputs (measured on an H100); kernel: always.
    assert not mamba2.use_kernel_path("auto", rows - 1, on_cuda=True)
    assert mamba2.use_kernel_path("auto", rows, on_cuda=True)
    assert mamba2.use_kernel_path("kernel", 1, on_cuda=True)
    assert not mamba2.use_kernel_path("auto", rows, on_cuda=False)


def _kernels():
    from thalamus_rl import kernels_available

    return kernels_available()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("with_state", [False, True])
def test_kernel_path_matches_pure_path(with_state):
    if not _kernels():
        pytest.skip("mamba-ssm / causal-conv1d kernels not installed")
    torch.manual_seed(0)
    block = Mamba2Block(64, d_state=16, headdim=32, chunk_size=32, backend="pure").cuda()
    x = torch.randn(4, 100, 64, device="cuda", requires_grad=True)
    resets = random_resets(4, 100).cuda()
    state0 = random_state(block, 4) if with_state else None
    y_pure, s_pure = block(x, state0, resets)
    g_pure = torch.autograd.grad(y_pure.square().sum(), [x, *block.parameters()])
    block.backend = "kernel"
    y_k, s_k = block(x, state0, resets)
    g_k = torch.autograd.grad(y_k.square().sum(), [x, *block.parameters()])
    torch.testing.assert_close(y_k, y_pure, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s_k.ssm, s_pure.ssm, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(s_k.conv, s_pure.conv, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_k, g_pure, strict=True):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_state_dict_loads_into_mamba_ssm_mamba2():
    mamba_ssm = pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    ours = Mamba2Block(64, d_state=16, headdim=32, chunk_size=32, backend="pure").cuda()
    theirs = mamba_ssm.Mamba2(64, d_state=16, headdim=32, chunk_size=32).cuda()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 64, 64, device="cuda")
    torch.testing.assert_close(theirs(x), ours(x)[0], atol=1e-3, rtol=1e-3)


def _fusable_blocks(n: int = 3) -> list[Mamba2Block]:
    """Same sizes, different time scales and random weights, as streams have."""
    torch.manual_seed(0)
    blocks = [
        Mamba2Block(16, d_state=8, headdim=8, chunk_size=8, dt_min=0.01 * (m + 1), backend="pure")
        for m in range(n)
    ]
    for b in blocks:
        with torch.no_grad():
            for p in b.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return blocks


def test_fused_forward_equals_each_block_alone():
    blocks = _fusable_blocks()
    assert blocks_fusable(blocks)
    batch, length = 3, 21
    x = torch.randn(batch, length, len(blocks), 16, requires_grad=True)
    resets = random_resets(batch, length)
    states = [random_state(b, batch) for b in blocks]
    y, new = mamba2_forward_multi(blocks, x, states, resets)
    refs = [b(x[:, :, m], s, resets) for m, (b, s) in enumerate(zip(blocks, states, strict=True))]
    torch.testing.assert_close(y, torch.stack([r[0] for r in refs], 2), atol=ATOL, rtol=ATOL)
    for s, (_, s_ref) in zip(new, refs, strict=True):
        torch.testing.assert_close(s.conv, s_ref.conv, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(s.ssm, s_ref.ssm, atol=ATOL, rtol=ATOL)
    # Same gradients for the input and every block's parameters.
    weights = torch.randn_like(y)
    params = [p for b in blocks for p in b.parameters()]
    grads = torch.autograd.grad((y * weights).sum(), [x, *params])
    y_ref = torch.stack([r[0] for r in refs], 2)
    grads_ref = torch.autograd.grad((y_ref * weights).sum(), [x, *params])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_fused_step_equals_each_block_alone():
    blocks = _fusable_blocks()
    x = torch.randn(4, len(blocks), 16)
    states = [random_state(b, 4) for b in blocks]
    y, new = mamba2_step_multi(blocks, x, states)
    for m, (b, s) in enumerate(zip(blocks, states, strict=True)):
        y_ref, s_ref = b.step(x[:, m], s)
        torch.testing.assert_close(y[:, m], y_ref, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(new[m].conv, s_ref.conv, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(new[m].ssm, s_ref.ssm, atol=ATOL, rtol=ATOL)


def test_blocks_of_different_sizes_are_not_fusable():
    assert not blocks_fusable([Mamba2Block(16, d_state=8), Mamba2Block(16, d_state=4)])
    assert not blocks_fusable([Mamba2Block(16, headdim=8), Mamba2Block(16, headdim=16)])
    assert not blocks_fusable([Mamba2Block(16, headdim=8, ngroups=2)] * 2)
