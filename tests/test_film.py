"""Mission FiLM on the tokens, the gate's query and the streams: identity at initialisation,
step == sequence, exact resets, act == evaluate_actions, mission dependence, gradients."""

from __future__ import annotations

import pytest
import torch
from gymnasium import spaces

import envs
from agents.experiment.config import load_config
from agents.policy import ThalamusPolicy
from tests.test_core import ATOL, inputs, random_state
from tests.test_mamba2 import random_resets
from tests.test_policy import SMALL, random_obs, warm_state
from thalamus_rl import ThalamusConfig, ThalamusCore
from thalamus_rl.film import FiLM

D, D_TASK = 32, 16
SITES = ("film_tokens", "film_gate", "film_streams")
ALL = dict.fromkeys(SITES, True)


def make(seed: int = 0, **overrides) -> ThalamusCore:
    torch.manual_seed(seed)
    args = dict(d_model=D, d_task=D_TASK, top_k=6, d_workspace=16, chunk_size=8, backend="pure")
    return ThalamusCore(ThalamusConfig(**{**args, **overrides}))


def films(core: ThalamusCore) -> dict[str, FiLM]:
    found = {
        "film_tokens": core.token_film,
        "film_gate": core.gate.query_film,
        "film_streams": core.stream_film,
    }
    return {name: film for name, film in found.items() if film is not None}


def randomise_films(module: torch.nn.Module, seed: int = 1, std: float = 0.3) -> None:
    """Move every FiLM away from the identity (a fresh one would make the tests trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, FiLM):
                for p in sub.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def test_film_is_the_identity_at_init_and_modulates_per_channel() -> None:
    film = FiLM(d_cond=4, d_features=3)
    x, cond = torch.randn(2, 5, 3), torch.randn(2, 4)
    assert torch.equal(film(x, cond), x)
    with torch.no_grad():
        film.proj.bias.copy_(torch.tensor([1.0, 0.0, -1.0, 0.5, 0.0, 0.0]))
    expected = x * torch.tensor([2.0, 1.0, 0.0]) + torch.tensor([0.5, 0.0, 0.0])
    torch.testing.assert_close(film(x, cond), expected)
    grouped = FiLM(d_cond=4, d_features=3, n_groups=2)
    y = torch.randn(2, 2, 3)
    assert torch.equal(grouped(y, cond), y)
    with pytest.raises(ValueError, match="n_groups=2"):
        grouped(torch.randn(2, 3, 3), cond)
    with pytest.raises(ValueError, match="cond must be"):
        film(x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="positive int"):
        FiLM(0, 3)


def test_film_off_builds_nothing_and_on_starts_as_the_same_function() -> None:
    plain = make()
    assert not films(plain) and not any("film" in name for name, _ in plain.named_parameters())
    filmed = make(**ALL)
    assert set(films(filmed)) == set(SITES)
    missing, unexpected = filmed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all("film" in name for name in missing) and missing
    args = inputs(2, 7)
    a, _ = plain(*args)
    b, _ = filmed(*args)
    torch.testing.assert_close(a.features, b.features)
    assert torch.equal(a.indices, b.indices)


@pytest.mark.parametrize(
    "sites", [ALL, *({s: True} for s in SITES)], ids=["all", *(s[5:] for s in SITES)]
)
def test_step_equals_forward_with_resets_with_film(sites: dict[str, bool]) -> None:
    core = make(**sites)
    randomise_films(core)
    batch, length = 3, 13
    tokens, mask, task, feedback, positions = inputs(batch, length)
    resets = random_resets(batch, length)
    state0 = random_state(core, batch)
    out, state = core(tokens, mask, task, feedback, positions, state0, resets)
    s, steps = state0, []
    for t in range(length):
        o, s = core.step(
            tokens[:, t], mask[:, t], task[:, t], feedback[:, t], positions[:, t], s, resets[:, t]
        )
        steps.append(o)
    torch.testing.assert_close(
        torch.stack([o.features for o in steps], 1), out.features, atol=ATOL, rtol=ATOL
    )
    assert torch.equal(torch.stack([o.indices for o in steps], 1), out.indices)
    torch.testing.assert_close(s.flatten(), state.flatten(), atol=ATOL, rtol=ATOL)


def test_reset_equals_fresh_sequence_with_film() -> None:
    core = make(**ALL)
    randomise_films(core)
    tokens, mask, task, feedback, positions = inputs(2, 12)
    resets = torch.zeros(2, 12, dtype=torch.bool)
    resets[:, 5] = True
    out, state = core(tokens, mask, task, feedback, positions, random_state(core, 2), resets)
    fresh, state_fresh = core(*(t[:, 5:] for t in (tokens, mask, task, feedback, positions)))
    torch.testing.assert_close(out.features[:, 5:], fresh.features, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(state.flatten(), state_fresh.flatten(), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("site", SITES)
def test_each_film_makes_the_features_depend_on_the_mission(site: str) -> None:
    """Changing the task changes the features through the FiLM alone: every other path of the
    task into the core (the gate's query, the readouts' query and context) is cut, so without
    the FiLM the task changes nothing."""
    core = make(**{site: True}, use_feedback=False)
    with torch.no_grad():
        for p in (core.gate.query_proj.weight, core.gate.query_proj.bias):
            p.zero_()
        core.gate.query_proj.bias.normal_()  # a task-independent query, so salience is not flat
    tokens, mask, task, feedback, positions = inputs(2, 6)
    other_task = torch.randn_like(task)
    # The readouts read the task only through the gate's query, which is now constant.
    before = core(tokens, mask, task, feedback, positions)[0].features
    assert torch.equal(before, core(tokens, mask, other_task, feedback, positions)[0].features)
    randomise_films(core)
    a = core(tokens, mask, task, feedback, positions)[0].features
    b = core(tokens, mask, other_task, feedback, positions)[0].features
    assert (a - b).abs().max() > 1e-3


def test_token_film_lets_the_mission_steer_the_selection() -> None:
    """With a task-independent gate query, only the token FiLM can change what is kept."""
    core = make(film_tokens=True, use_feedback=False)
    with torch.no_grad():
        core.gate.query_proj.weight.zero_()
    tokens, mask, task, feedback, positions = inputs(4, 6)
    other_task = torch.randn_like(task)
    assert torch.equal(
        core(tokens, mask, task, feedback, positions)[0].indices,
        core(tokens, mask, other_task, feedback, positions)[0].indices,
    )
    randomise_films(core, std=1.0)
    a = core(tokens, mask, task, feedback, positions)[0].indices
    b = core(tokens, mask, other_task, feedback, positions)[0].indices
    assert not torch.equal(a, b)


def test_gradients_reach_every_film_from_the_identity() -> None:
    core = make(**ALL)  # fresh: the FiLMs are the identity, their maps zero
    out, _ = core(*inputs(2, 8))
    out.features.square().mean().backward()
    for name, film in films(core).items():
        grad = film.proj.weight.grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert {f"film/{s[5:]}_norm" for s in SITES} <= set(out.stats)


def test_act_step_by_step_equals_evaluate_actions_with_film() -> None:
    space = envs.make_env("MiniGrid-DoorKey-5x5-v0").observation_space
    torch.manual_seed(0)
    policy = ThalamusPolicy(
        space, spaces.Discrete(7), lambda _: 1e-3, thalamus={**SMALL, **ALL}
    ).eval()
    randomise_films(policy)
    batch, steps = 3, 10
    obs = random_obs(space, (batch, steps))
    starts = torch.zeros(batch, steps, dtype=torch.bool)
    starts[0, 0] = starts[1, 4] = starts[2, 2] = starts[2, 3] = True
    state0 = warm_state(policy, space, batch)
    state, values, log_probs, actions = state0, [], [], []
    with torch.no_grad():
        for t in range(steps):
            step = policy.act({k: v[:, t] for k, v in obs.items()}, state, starts[:, t])
            state = step.state
            values.append(step.values)
            log_probs.append(step.log_probs)
            actions.append(step.actions)
        seq = policy.evaluate_actions(obs, torch.stack(actions, 1), state0, starts)
    torch.testing.assert_close(seq.values, torch.stack(values, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(seq.log_prob, torch.stack(log_probs, 1), atol=1e-5, rtol=0)


def test_film_is_set_from_the_config() -> None:
    config = load_config(None, ["thalamus.film_tokens=true", "thalamus.film_streams=true"])
    assert config.thalamus.film_tokens and config.thalamus.film_streams
    assert not config.thalamus.film_gate
    assert not ThalamusConfig().film_tokens  # today's model stays the default
