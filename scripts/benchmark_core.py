"""Time the thalamus core against an sb3-contrib-style LSTM, in one run, on this machine.

Measures, with medians over repeats:
  * training: forward + backward of ThalamusCore over a [B, T] sequence of MiniGrid-sized
    token sets (49 cells + mission words + 1 proprio token), and of each part alone;
  * rollout: per-step latency of ``ThalamusCore.step`` at batch B (no grad);
  * baseline: an ``nn.LSTM`` (hidden 128) run the way sb3-contrib's RecurrentPPO runs it
    in training when a sequence holds episode starts (a Python loop over steps, the state
    masked by ``1 - episode_start`` each step), and its per-step rollout latency.

Usage::

    python scripts/benchmark_core.py [--batch 16] [--length 128] [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from thalamus_rl import ThalamusConfig, ThalamusCore


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def random_starts(batch: int, length: int, p: float, generator: torch.Generator) -> Tensor:
    """Episode starts with a reset at t=0 in env 0 and back-to-back resets in env 1."""
    starts = torch.rand(batch, length, generator=generator) < p
    starts[0, 0] = True
    if batch > 1 and length > 4:
        starts[1, 3] = starts[1, 4] = True
    return starts


def core_inputs(
    cfg: ThalamusConfig,
    batch: int,
    length: int,
    device: torch.device,
    seed: int = 0,
    mission_words: int = 10,
    reset_p: float = 0.05,
) -> tuple[Tensor, ...]:
    """MiniGrid-sized token sets: 49 cells + mission words (half padded) + 1 proprio token."""
    g = torch.Generator().manual_seed(seed)
    n = 49 + mission_words + 1
    tokens = torch.randn(batch, length, n, cfg.d_model, generator=g)
    mask = torch.ones(batch, length, n, dtype=torch.bool)
    mask[:, :, 49 + mission_words // 2 : 49 + mission_words] = False
    task = torch.randn(batch, length, cfg.d_task, generator=g)
    feedback = torch.randn(batch, length, cfg.n_feedback_signals, generator=g)
    positions = torch.rand(batch, length, n, 2, generator=g)
    starts = random_starts(batch, length, reset_p, g)
    return tuple(t.to(device) for t in (tokens, mask, task, feedback, positions, starts))


def lstm_sb3_style(lstm: nn.LSTM, x: torch.Tensor, starts: torch.Tensor, state):
    """sb3-contrib ``RecurrentActorCriticPolicy._process_sequence`` with episode starts:
    one LSTM call per step, state multiplied by ``1 - episode_start``."""
    h, c = state
    outs = []
    for t in range(x.shape[0]):
        keep = (1.0 - starts[t].float()).view(1, -1, 1)
        out, (h, c) = lstm(x[t : t + 1], (keep * h, keep * c))
        outs.append(out)
    return torch.cat(outs), (h, c)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--mission-words", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--d-model", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = ThalamusConfig(d_model=args.d_model, d_task=args.d_model, backend="pure")
    core = ThalamusCore(cfg)
    B, T, d = args.batch, args.length, cfg.d_model
    tokens, mask, task, feedback, positions, starts = core_inputs(
        cfg, B, T, torch.device("cpu"), mission_words=args.mission_words
    )

    def core_train():
        out, _ = core(tokens, mask, task, feedback, positions, None, starts)
        out.features.square().mean().backward()

    # Parts alone, on the inputs they see inside the core.
    S = B * T
    flat = lambda t: t.reshape(S, *t.shape[2:])  # noqa: E731
    with torch.no_grad():
        gate_out = core.gate(flat(tokens), flat(task), flat(feedback), flat(mask), flat(positions))
        kept = core.workspace(gate_out.tokens, gate_out.phase, gate_out.kept_mask)
        stream_in = core.readout(kept, gate_out.kept_mask, gate_out.query, gate_out.rest).view(
            B, T, -1, d
        )

    def gate_train():
        g = core.gate(flat(tokens), flat(task), flat(feedback), flat(mask), flat(positions))
        g.tokens.square().mean().backward()

    def workspace_train():
        y = core.workspace(gate_out.tokens, gate_out.phase, gate_out.kept_mask)
        y.square().mean().backward()

    def readout_train():
        y = core.readout(kept, gate_out.kept_mask, gate_out.query, gate_out.rest)
        y.square().mean().backward()

    def streams_train():
        w, _, _ = core.streams(stream_in, None, starts)
        w.square().mean().backward()

    state = core.initial_state(B)
    step_in = (tokens[:, 0], mask[:, 0], task[:, 0], feedback[:, 0], positions[:, 0])

    def core_step():
        with torch.inference_mode():
            core.step(*step_in, state, starts[:, 0])

    lstm = nn.LSTM(d, 128)
    x_lstm = torch.randn(T, B, d)
    h0 = (torch.zeros(1, B, 128), torch.zeros(1, B, 128))
    starts_tb = starts.t()

    def lstm_train():
        out, _ = lstm_sb3_style(lstm, x_lstm, starts_tb, h0)
        out.square().mean().backward()

    def lstm_step():
        with torch.inference_mode():
            keep = (1.0 - starts_tb[0].float()).view(1, -1, 1)
            lstm(x_lstm[:1], (keep * h0[0], keep * h0[1]))

    rows = [
        ("ThalamusCore fwd+bwd", median_ms(core_train, args.repeats)),
        ("  gate (PhaseGate + FeedbackLayer)", median_ms(gate_train, args.repeats)),
        ("  workspace (PhaseWorkspace, K tokens)", median_ms(workspace_train, args.repeats)),
        ("  stream readouts", median_ms(readout_train, args.repeats)),
        ("  streams (DistributedMamba)", median_ms(streams_train, args.repeats)),
        ("LSTM-128 fwd+bwd, sb3-contrib loop", median_ms(lstm_train, args.repeats)),
        ("ThalamusCore.step (rollout, 1 step)", median_ms(core_step, 5 * args.repeats)),
        ("LSTM-128 step (rollout, 1 step)", median_ms(lstm_step, 5 * args.repeats)),
    ]
    n_params = sum(p.numel() for p in core.parameters())
    print(
        f"# B={B} T={T} N={tokens.shape[2]} d_model={d} K={cfg.top_k} streams={len(cfg.streams)} "
        f"iterations={cfg.n_iterations} params={n_params} threads={args.threads} "
        f"torch={torch.__version__}"
    )
    print(f"| {'what':<40} | {'median ms':>10} | {'x LSTM':>7} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 9}|")
    lstm_train_ms, lstm_step_ms = rows[5][1], rows[7][1]
    for name, ms in rows:
        base = lstm_step_ms if "step" in name else lstm_train_ms
        print(f"| {name:<40} | {ms:>10.2f} | {ms / base:>7.2f} |")


if __name__ == "__main__":
    main()
