"""The gate learns *what* to select: the test the prototypes' top-K would fail.

A supervised probe: among 40 distractor tokens there is one "key" token, and the target is
the key's colour. At initialisation the key is essentially never in the top K; the gate must
learn to rank it first from the loss on its outputs alone.
"""

from __future__ import annotations

import torch
from torch import nn

from thalamus_rl import PhaseGate

N, D, K, COLOURS = 40, 32, 4, 6


class Probe(nn.Module):
    """Token embeddings -> PhaseGate -> (kept tokens, rest summary) -> colour logits."""

    def __init__(self, use_rest: bool) -> None:
        super().__init__()
        self.use_rest = use_rest
        self.obj = nn.Embedding(6, D)
        self.colour = nn.Embedding(COLOURS, D)
        self.norm = nn.LayerNorm(D)
        self.gate = PhaseGate(D, D, top_k=K, use_feedback=False)
        self.head = nn.Sequential(nn.Linear(2 * D, 64), nn.ReLU(), nn.Linear(64, COLOURS))

    def forward(self, types, colours):
        tokens = self.norm(self.obj(types) + self.colour(colours))
        out = self.gate(tokens, torch.zeros(types.shape[0], D))
        rest = out.rest if self.use_rest else torch.zeros_like(out.rest)
        return self.head(torch.cat([out.tokens.sum(1), rest], -1)), out


def train_probe(use_rest: bool, steps: int = 150, batch: int = 64) -> float:
    torch.manual_seed(0)
    probe = Probe(use_rest)
    # Start from a ranking that puts the key last, so selection must be learned.
    with torch.no_grad():
        probe.obj.weight[5] = -probe.obj.weight[:5].mean(0) * 3
    opt = torch.optim.Adam(probe.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    selected = 0.0
    for _ in range(steps):
        types = torch.randint(0, 5, (batch, N), generator=g)
        colours = torch.randint(0, COLOURS, (batch, N), generator=g)
        where = torch.randint(0, N, (batch,), generator=g)
        types[torch.arange(batch), where] = 5
        logits, out = probe(types, colours)
        loss = nn.functional.cross_entropy(logits, colours[torch.arange(batch), where])
        opt.zero_grad()
        loss.backward()
        opt.step()
        selected = (out.indices == where[:, None]).any(-1).float().mean().item()
    return selected


def test_gate_learns_to_select_a_token_it_starts_by_dropping():
    assert train_probe(use_rest=True) > 0.9


def test_without_the_rest_summary_the_same_budget_does_not_suffice():
    """The control: the kept-token weights alone give a dropped token no gradient, so the
    key can only enter once every distractor type has been pushed below it."""
    assert train_probe(use_rest=False) < 0.2
