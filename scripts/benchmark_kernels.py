"""Check and time the mamba-ssm kernel path of Mamba2Block against the pure-PyTorch path.

One run does both parts (DESIGN.md rule 4: the pure path is the reference):
  * check: a Mamba2Block and a whole ThalamusCore on fresh random inputs with episode
    resets inside the sequence and a random initial state; every backend asked for runs in
    float32 and is compared with the pure path in float64 by the relative error
    ``||out - ref|| / ||ref||`` of the output, the final state and the gradients of the
    input and of every parameter;
  * time: forward + backward over ``[B, T]`` sequences, the median of ``--repeats`` timings
    (CUDA events on a GPU), for a Mamba2Block, for ThalamusCore at PPO-minibatch sizes,
    and for sb3-contrib's LSTM loop as the baseline (``scripts/benchmark_core.py``).

Usage (on a GPU machine after ``pip install -e .[cuda]``; on a CPU only the pure path runs)::

    python scripts/benchmark_kernels.py [--backends pure,kernel] [--sizes 16x128,64x128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from thalamus_rl import ThalamusConfig, ThalamusCore, kernels_available
from thalamus_rl.mamba2 import Mamba2Block, Mamba2State

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmark_core import core_inputs, lstm_sb3_style, random_starts  # noqa: E402

# (name, relative error) rows; errors are against the float64 pure path.
CheckRows = list[tuple[str, float]]


def relative_error(out: Tensor, ref: Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64 (NaN anywhere gives NaN)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def time_ms(fn: Callable[[], object], repeats: int, device: torch.device, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in ms; on CUDA measured with events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


# ---------------------------------------------------------------------------- Mamba2Block
def _block_outputs(
    block: Mamba2Block, x: Tensor, state: Mamba2State, starts: Tensor, weight: Tensor
) -> dict[str, Tensor]:
    x = x.detach().requires_grad_(True)
    y, final = block(x, state, starts)
    loss = (y * weight).sum() + final.ssm.sum() + final.conv.sum()
    grads = torch.autograd.grad(loss, [x, *block.parameters()])
    out = {"y": y.detach(), "state.ssm": final.ssm.detach(), "state.conv": final.conv.detach()}
    out["grad x"] = grads[0]
    for (name, _), g in zip(block.named_parameters(), grads[1:], strict=True):
        out[f"grad {name}"] = g
    return out


def check_block(
    backends: list[str],
    device: torch.device,
    batch: int = 4,
    length: int = 100,
    chunk_size: int = 32,
    reset_p: float = 0.1,
    seed: int = 0,
) -> dict[str, CheckRows]:
    """Each backend's Mamba2Block (float32) against the pure path in float64.

    :return: ``{backend: [(quantity, relative error), ...]}``.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    block = Mamba2Block(64, d_state=16, headdim=32, chunk_size=chunk_size, backend="pure")
    with torch.no_grad():  # away from the init, so that every parameter matters
        for p in block.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(batch, length, 64, generator=g)
    init = block.initial_state(batch)
    state = Mamba2State(
        conv=torch.randn(init.conv.shape, generator=g), ssm=torch.randn(init.ssm.shape, generator=g)
    )
    starts = random_starts(batch, length, reset_p, g)
    weight = torch.randn(batch, length, 64, generator=g)

    def run(dtype: torch.dtype, backend: str) -> dict[str, Tensor]:
        b = copy.deepcopy(block).to(device=device, dtype=dtype)
        b.backend = backend
        s = Mamba2State(*(t.to(device=device, dtype=dtype) for t in state))
        return _block_outputs(
            b, x.to(device, dtype), s, starts.to(device), weight.to(device, dtype)
        )

    ref = run(torch.float64, "pure")
    results = {}
    for backend in backends:
        out = run(torch.float32, backend)
        results[backend] = [(k, relative_error(out[k], ref[k])) for k in ref]
    return results


# ---------------------------------------------------------------------------- ThalamusCore
def check_core(
    backends: list[str], device: torch.device, batch: int = 4, length: int = 70, seed: int = 0
) -> dict[str, CheckRows]:
    """Each backend's ThalamusCore (float32, default config) against pure float64: the
    features, the final stream states and the gradients of every parameter."""
    torch.manual_seed(seed)
    cfg = ThalamusConfig(backend="pure", chunk_size=32)
    core = ThalamusCore(cfg)
    inputs = core_inputs(cfg, batch, length, torch.device("cpu"), seed)
    weight = torch.randn(
        batch, length, cfg.d_workspace, generator=torch.Generator().manual_seed(seed)
    )

    def run(dtype: torch.dtype, backend: str) -> dict[str, Tensor]:
        c = copy.deepcopy(core).to(device=device, dtype=dtype)
        for module in c.modules():
            if isinstance(module, Mamba2Block):
                module.backend = backend
        tokens, mask, task, feedback, positions, starts = (
            t.to(device) if not t.is_floating_point() else t.to(device, dtype) for t in inputs
        )
        out, state = c(tokens, mask, task, feedback, positions, None, starts)
        loss = (out.features * weight.to(device, dtype)).sum()
        grads = torch.autograd.grad(loss, list(c.parameters()), allow_unused=True)
        res = {"features": out.features.detach()}
        leaves = [t for t in torch.utils._pytree.tree_leaves(state) if isinstance(t, Tensor)]
        res["final state"] = torch.cat([t.detach().flatten() for t in leaves])
        res["grad (all parameters)"] = torch.cat([gr.flatten() for gr in grads if gr is not None])
        return res

    ref = run(torch.float64, "pure")
    return {
        b: [(k, relative_error(v, ref[k])) for k, v in run(torch.float32, b).items()]
        for b in backends
    }


# ---------------------------------------------------------------------------- timing
def fwd_bwd(model: Callable[[], Tensor]) -> Callable[[], None]:
    """A closure that runs ``model()`` and backpropagates the mean square of its output."""

    def run() -> None:
        model().square().mean().backward()

    return run


def _block_out(block: Mamba2Block, x: Tensor, starts: Tensor) -> Tensor:
    return block(x, None, starts)[0]


def _core_out(core: ThalamusCore, inputs: tuple[Tensor, ...]) -> Tensor:
    return core(*inputs[:5], None, inputs[5])[0].features


def _lstm_out(lstm: nn.LSTM, x: Tensor, starts: Tensor, h0: tuple[Tensor, Tensor]) -> Tensor:
    return lstm_sb3_style(lstm, x, starts, h0)[0]


def time_sizes(
    backends: list[str], sizes: list[tuple[int, int]], device: torch.device, repeats: int
) -> list[tuple[str, str, float]]:
    """``(what, size, median ms)`` rows: fwd+bwd of Mamba2Block, ThalamusCore and the LSTM."""
    rows = []
    for batch, length in sizes:
        size = f"{batch}x{length}"
        x = torch.randn(batch, length, 64, device=device, requires_grad=True)
        starts = torch.rand(batch, length, device=device) < 0.05
        for backend in backends:
            block = Mamba2Block(64, d_state=16, headdim=32, chunk_size=64, backend=backend)
            run = fwd_bwd(partial(_block_out, block.to(device), x, starts))
            rows.append((f"Mamba2Block fwd+bwd, {backend}", size, time_ms(run, repeats, device)))
        for backend in backends:
            cfg = ThalamusConfig(backend=backend)
            core = ThalamusCore(cfg).to(device)
            inputs = core_inputs(cfg, batch, length, device)
            run = fwd_bwd(partial(_core_out, core, inputs))
            rows.append((f"ThalamusCore fwd+bwd, {backend}", size, time_ms(run, repeats, device)))
        lstm = nn.LSTM(64, 128).to(device)
        x_lstm = torch.randn(length, batch, 64, device=device)
        h0 = (torch.zeros(1, batch, 128, device=device), torch.zeros(1, batch, 128, device=device))
        run = fwd_bwd(partial(_lstm_out, lstm, x_lstm, starts.t().contiguous(), h0))
        rows.append(("LSTM-128 fwd+bwd, sb3-contrib loop", size, time_ms(run, repeats, device)))
    return rows


def parse_sizes(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(v) for v in s.split("x")) for s in text.split(",")]  # type: ignore[misc]
    except ValueError:
        raise SystemExit(
            f"--sizes wants BxT pairs separated by commas, like 16x128,64x128; got {text!r}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backends", default=None, help="comma list of pure,kernel (default: all available)"
    )
    parser.add_argument(
        "--sizes", default="16x128,64x128,256x128,64x1024", help="BxT for the timings"
    )
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = ["pure", "kernel"] if kernels_available() else ["pure"]
    backends = args.backends.split(",") if args.backends else available
    missing = [b for b in backends if b not in available]
    if missing:
        print(
            f"backend(s) {missing} not available here (CUDA: {torch.cuda.is_available()}, "
            f"kernels importable: {kernels_available()}); install them with "
            "`pip install -e .[cuda]` on a GPU machine or pass --backends pure",
            file=sys.stderr,
        )
        return 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# device {name}, torch {torch.__version__}, backends {backends}")
    failed = False
    for what, results in (
        ("Mamba2Block B=4 T=100 chunk 32, resets p=0.1", check_block(backends, device)),
        (
            "Mamba2Block B=3 T=64 chunk 16, resets p=0.5",
            check_block(backends, device, 3, 64, 16, 0.5, seed=1),
        ),
        ("ThalamusCore B=4 T=70 chunk 32", check_core(backends, device)),
    ):
        print(f"\n## check: {what}; relative error against the pure path in float64")
        print(f"| {'quantity':<28} | " + " | ".join(f"{b:>9}" for b in backends) + " |")
        keys = [k for k, _ in results[backends[0]]]
        for i, key in enumerate(keys):
            errs = [results[b][i][1] for b in backends]
            failed |= any(not (e < 1e-2) for e in errs)
            print(f"| {key:<28} | " + " | ".join(f"{e:9.1e}" for e in errs) + " |")
    if not args.skip_timing:
        rows = time_sizes(backends, parse_sizes(args.sizes), device, args.repeats)
        print(f"\n## time: forward + backward, median of {args.repeats} (ms)")
        print(f"| {'what':<38} | {'BxT':>8} | {'ms':>8} |")
        for what, size, ms in rows:
            print(f"| {what:<38} | {size:>8} | {ms:8.2f} |")
    if failed:
        print("\nFAILED: a relative error is 1e-2 or more (or NaN)", file=sys.stderr)
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
