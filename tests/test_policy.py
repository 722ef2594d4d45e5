"""ThalamusPolicy: one step == whole sequence, predict's recurrent contract, configs, ablations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

import envs
from agents.policy import ActorCriticState, ThalamusPolicy, make_thalamus_config
from thalamus_rl import ThalamusConfig, ThalamusCore, ThalamusState

SMALL = dict(d_model=32, d_task=16, n_heads=4, top_k=8, phase_dim=4, d_workspace=32)


@pytest.fixture(scope="module")
def observation_space() -> spaces.Dict:
    return envs.make_env("MiniGrid-DoorKey-5x5-v0").observation_space


def make_policy(
    space: spaces.Dict,
    seed: int = 0,
    critic_trunk: str = "shared",
    intrinsic_value_head: bool = False,
    **thalamus: Any,
) -> ThalamusPolicy:
    th.manual_seed(seed)
    return ThalamusPolicy(
        space,
        spaces.Discrete(7),
        lambda _: 1e-3,
        thalamus={**SMALL, **thalamus},
        critic_trunk=critic_trunk,
        intrinsic_value_head=intrinsic_value_head,
    ).eval()


def random_obs(space: spaces.Dict, shape: tuple[int, ...], seed: int = 0) -> dict[str, th.Tensor]:
    """Observations with leading ``shape``; images hold MiniGrid-like small ids."""
    space.seed(seed)
    n = int(np.prod(shape))
    samples = [space.sample() for _ in range(n)]
    out = {}
    for key, sub in space.spaces.items():
        x = np.stack([np.asarray(s[key]) for s in samples])
        if key == "image":
            x = x % 11
        out[key] = th.as_tensor(x).reshape(*shape, *sub.shape)
    return out


def warm_state(policy: ThalamusPolicy, space: spaces.Dict, batch: int) -> ThalamusState:
    """A non-zero state: a few steps from zeros."""
    state = None
    with th.no_grad():
        for t in range(3):
            state = policy.act(random_obs(space, (batch,), seed=100 + t), state, None).state
    return state


@pytest.mark.parametrize(
    "ablation",
    [
        {},
        {"use_feedback": False},
        {"gate_enabled": False},
        {"n_iterations": 1},
        {"streams": [dict(name="only", dt_min=0.01, dt_max=0.1)]},
        {"readout_salience_bias": True},
        {
            "streams": [
                dict(name="visual"),
                dict(name="semantic", dt_min=0.005, dt_max=0.05, clock=4),
                dict(name="episodic", kind="episodic", capacity=5),
            ]
        },
        {"critic_trunk": "separate"},
        {
            "critic_trunk": "separate",
            "streams": [
                dict(name="visual"),
                dict(name="semantic", dt_min=0.005, dt_max=0.05, clock=4),
                dict(name="episodic", kind="episodic", capacity=5),
            ],
        },
        {"critic_trunk": "detached"},
    ],
    ids=[
        "full",
        "no_feedback",
        "no_gate",
        "one_iteration",
        "one_stream",
        "readout_bias",
        "three_streams",
        "separate_critic",
        "separate_critic_three_streams",
        "detached_critic",
    ],
)
def test_act_step_by_step_equals_evaluate_actions(
    observation_space: spaces.Dict, ablation: dict[str, Any]
) -> None:
    """Rollout (act, one step at a time) and training (evaluate_actions, one scan) compute the
    same function from a stored state, with episode starts inside the sequence. With a
    separate critic trunk the values come from the critic's own core and state, so they check
    its resets inside the scan."""
    policy = make_policy(observation_space, **ablation)
    batch, steps = 3, 12
    obs = random_obs(observation_space, (batch, steps))
    starts = th.zeros(batch, steps, dtype=th.bool)
    starts[0, 0] = True
    starts[1, 5] = True
    starts[2, 3] = starts[2, 4] = True
    state0 = warm_state(policy, observation_space, batch)

    state = state0
    values, log_probs, actions = [], [], []
    with th.no_grad():
        for t in range(steps):
            step = policy.act({k: v[:, t] for k, v in obs.items()}, state, starts[:, t])
            state = step.state
            values.append(step.values)
            log_probs.append(step.log_probs)
            actions.append(step.actions)
        seq = policy.evaluate_actions(obs, th.stack(actions, 1), state0, starts)
    th.testing.assert_close(seq.values, th.stack(values, 1), atol=1e-5, rtol=0)
    th.testing.assert_close(seq.log_prob, th.stack(log_probs, 1), atol=1e-5, rtol=0)
    assert seq.entropy is not None and seq.entropy.shape == (batch, steps)
    assert seq.thalamus.features.shape[:2] == (batch, steps)


def test_episode_start_forgets_the_past(observation_space: spaces.Dict) -> None:
    policy = make_policy(observation_space)
    obs = random_obs(observation_space, (2,))
    state = warm_state(policy, observation_space, 2)
    with th.no_grad():
        fresh = policy.act(obs, None, None, deterministic=True)
        reset = policy.act(obs, state, th.ones(2, dtype=th.bool), deterministic=True)
        carried = policy.act(obs, state, th.zeros(2, dtype=th.bool), deterministic=True)
    th.testing.assert_close(reset.values, fresh.values)
    assert not th.allclose(carried.values, fresh.values)


def test_predict_follows_the_recurrent_contract(observation_space: spaces.Dict) -> None:
    policy = make_policy(observation_space)
    obs = {k: v.numpy() for k, v in random_obs(observation_space, (3,)).items()}

    actions, state = policy.predict(obs, deterministic=True)
    assert actions.shape == (3,) and isinstance(state, ThalamusState)
    assert state.batch_size == 3
    # state=None means zeros; an episode start resets whatever state is passed.
    zeros = policy.initial_state(3)
    same, _ = policy.predict(obs, state=zeros, episode_start=np.zeros(3, bool), deterministic=True)
    np.testing.assert_array_equal(same, actions)
    reset, _ = policy.predict(obs, state=state, episode_start=np.ones(3, bool), deterministic=True)
    np.testing.assert_array_equal(reset, actions)

    single = {k: v[0] for k, v in obs.items()}  # one unbatched observation
    action, state1 = policy.predict(single, deterministic=True)
    assert action.shape == () and state1.batch_size == 1
    assert int(action) == int(actions[0])

    with pytest.raises(ValueError, match="state of 3 envs"):
        policy.predict(single, state=state)


def test_policy_save_load(observation_space: spaces.Dict, tmp_path: Path) -> None:
    th.manual_seed(0)
    policy = ThalamusPolicy(
        observation_space,
        spaces.Discrete(7),
        lambda _: 1e-3,
        thalamus={**SMALL, "top_k": 5},
        tokenizer={"max_word_tokens": 4},
    )
    path = tmp_path / "policy.pt"
    policy.save(str(path))
    loaded = ThalamusPolicy.load(str(path), device="cpu")
    assert loaded.core.config.top_k == 5
    assert (
        loaded.tokenizer.token_layout.mission.stop - loaded.tokenizer.token_layout.mission.start
        == 4
    )
    obs = {k: v.numpy() for k, v in random_obs(observation_space, (4,)).items()}
    a, s = policy.predict(obs, deterministic=True)
    b, t = loaded.predict(obs, deterministic=True)
    np.testing.assert_array_equal(a, b)
    th.testing.assert_close(s.flatten(), t.flatten())


def test_orthogonal_init_leaves_the_core_alone(observation_space: spaces.Dict) -> None:
    """The heads get SB3's orthogonal init; the core keeps its own (built first, same seed)."""
    policy = make_policy(observation_space, seed=3)
    th.manual_seed(3)
    reference = ThalamusCore(policy.core.config)
    for (name, a), (_, b) in zip(
        policy.core.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        th.testing.assert_close(a, b, msg=name)


def test_thalamus_config_from_policy_kwargs(observation_space: spaces.Dict) -> None:
    config = make_thalamus_config({"top_k": 3, "streams": [dict(name="s")]}, 3)
    assert isinstance(config, ThalamusConfig) and config.top_k == 3
    assert config.n_feedback_signals == 3 and len(config.streams) == 1
    with pytest.raises(ValueError, match="top_kk"):
        make_thalamus_config({"top_kk": 3}, 3)
    with pytest.raises(ValueError, match="n_feedback_signals"):
        make_policy(observation_space, n_feedback_signals=5)


def test_non_dict_space_is_rejected() -> None:
    with pytest.raises(TypeError, match="Dict observation space"):
        ThalamusPolicy(spaces.Box(0, 1, (4,)), spaces.Discrete(2), lambda _: 1e-3)


def test_stateless_extractor_call_explains_itself(observation_space: spaces.Dict) -> None:
    policy = make_policy(observation_space)
    with pytest.raises(TypeError, match="recurrent"):
        policy.features_extractor(random_obs(observation_space, (1,)))


def test_top_k_above_the_tokens_the_space_gives_is_refused_naming_both(
    observation_space: spaces.Dict,
) -> None:
    """Issue 32 row 7: top_k=1000 on ~60 tokens trained for 13 min in ~15 GB before."""
    n_tokens = make_policy(observation_space).features_extractor.tokenizer.n_tokens
    make_policy(observation_space, top_k=n_tokens)  # every token kept: fine
    make_policy(observation_space, top_k=1000, gate_enabled=False)  # no selection: unused
    with pytest.raises(ValueError, match=rf"top_k = 1000 is more than the {n_tokens} tokens"):
        make_policy(observation_space, top_k=1000)

    from agents.experiment.config import DEFAULT_CONFIG, ConfigError, load_config
    from agents.experiment.training import build_agent

    config = load_config(DEFAULT_CONFIG, ["thalamus.top_k=1000", "env.n_envs=2"])
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    try:
        with pytest.raises(ConfigError, match=rf"at most {n_tokens}"):
            build_agent(config, venv)
    finally:
        venv.close()


def _flat_state(state: ThalamusState) -> list[th.Tensor]:
    return [t for t in th.utils._pytree.tree_leaves(state) if isinstance(t, th.Tensor)]


@pytest.mark.slow
def test_compiled_core_equals_eager_without_recompiling(observation_space: spaces.Dict) -> None:
    """policy.compile_core: the compiled step and sequence pass give the eager core's outputs,
    states and gradients to 1e-5, and new episode-start patterns compile nothing new."""
    from torch._dynamo.utils import counters

    th._dynamo.reset()
    th.manual_seed(0)
    policy = ThalamusPolicy(
        observation_space,
        spaces.Discrete(7),
        lambda _: 1e-3,
        thalamus={**SMALL, "n_iterations": 2},
        compile_core=True,
    ).eval()
    extractor = policy.features_extractor
    batch, length = 3, 6
    obs = random_obs(observation_space, (batch, length), seed=3)
    state0 = warm_state(policy, observation_space, batch)
    patterns = [
        th.zeros(batch, length, dtype=th.bool),
        th.tensor([[0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 1]], dtype=th.bool),
        th.ones(batch, length, dtype=th.bool),
    ]

    def steps(starts: th.Tensor, compiled: bool) -> tuple[list[th.Tensor], ThalamusState]:
        state, feats = state0, []
        with th.no_grad():
            for t in range(length):
                o = {k: v[:, t] for k, v in obs.items()}
                out, state = extractor.step(o, state, starts[:, t], False, compiled=compiled)
                feats.append(out.features)
        return feats, state

    def sequence(starts: th.Tensor, compiled: bool) -> tuple[th.Tensor, list[th.Tensor]]:
        policy.zero_grad(set_to_none=True)
        out, state = extractor.sequence(obs, state0, starts, False, compiled=compiled)
        (
            out.features.square().mean() + sum(s.square().mean() for s in _flat_state(state))
        ).backward()
        grads = [p.grad.clone() for p in extractor.parameters() if p.grad is not None]
        return out.features.detach(), grads

    graphs_after_first = None
    for i, starts in enumerate(patterns):
        fc, sc = steps(starts, compiled=True)
        fe, se = steps(starts, compiled=False)
        for a, b in zip(fc + _flat_state(sc), fe + _flat_state(se), strict=True):
            th.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        yc, gc = sequence(starts, compiled=True)
        ye, ge = sequence(starts, compiled=False)
        th.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
        assert len(gc) == len(ge) > 0
        for a, b in zip(gc, ge, strict=True):
            th.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        if i == 1:  # both branches (with and without resets) have been seen
            graphs_after_first = counters["stats"]["unique_graphs"]
    assert graphs_after_first is not None and graphs_after_first > 0
    # A recompilation (a guard on the values of episode_starts, say) adds a graph.
    assert counters["stats"]["unique_graphs"] == graphs_after_first, "recompiled"


# ----------------------------------------------------------------------------- critic trunk
def _losses(policy: ThalamusPolicy, space: spaces.Dict) -> tuple[th.Tensor, th.Tensor]:
    """A policy loss (log-probs only) and a value loss of one short sequence, one graph."""
    batch, steps = 2, 5
    obs = random_obs(space, (batch, steps), seed=3)
    starts = th.zeros(batch, steps, dtype=th.bool)
    starts[1, 2] = True
    actions = th.randint(0, 7, (batch, steps), generator=th.Generator().manual_seed(0))
    seq = policy.evaluate_actions(obs, actions, policy.initial_state(batch), starts)
    value_loss = seq.values.square().mean()
    if seq.intrinsic_values is not None:
        value_loss = value_loss + seq.intrinsic_values.square().mean()
    return seq.log_prob.mean(), value_loss


def _reached(module: th.nn.Module) -> bool:
    """Whether any gradient reached ``module``'s parameters."""
    return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("intrinsic", [False, True], ids=["value_head", "with_intrinsic_head"])
def test_separate_critic_trunk_splits_the_gradients(
    observation_space: spaces.Dict, intrinsic: bool
) -> None:
    """With critic_trunk='separate' the value losses (the intrinsic head's too) train only
    the critic's tokenizer and core, the policy loss only the actor's."""
    policy = make_policy(
        observation_space, critic_trunk="separate", intrinsic_value_head=intrinsic
    ).train()
    critic = policy.critic_extractor
    assert critic is not None and critic is not policy.features_extractor
    policy_loss, value_loss = _losses(policy, observation_space)
    value_loss.backward(retain_graph=True)
    assert _reached(critic) and not _reached(policy.features_extractor)
    assert not _reached(policy.action_net)
    if intrinsic:
        assert policy.intrinsic_value_net is not None and _reached(policy.intrinsic_value_net)
    policy.zero_grad(set_to_none=True)
    policy_loss.backward()
    assert _reached(policy.features_extractor) and not _reached(critic)
    assert not _reached(policy.value_net)


@pytest.mark.parametrize("trunk", ["shared", "detached"])
def test_value_loss_reaches_the_actor_core_only_when_shared(
    observation_space: spaces.Dict, trunk: str
) -> None:
    policy = make_policy(observation_space, critic_trunk=trunk, intrinsic_value_head=True).train()
    assert policy.critic_extractor is None
    _, value_loss = _losses(policy, observation_space)
    value_loss.backward()
    assert _reached(policy.features_extractor) == (trunk == "shared")
    assert _reached(policy.value_net)


def test_critic_trunk_keeps_the_actor_and_its_random_stream(
    observation_space: spaces.Dict,
) -> None:
    """At the same seed every critic trunk gives the same actor (parameters, sampled actions,
    log-probs: the separate critic core is drawn from a stream of its own), and the separate
    critic core is not a copy of the actor's."""
    obs = random_obs(observation_space, (3,))
    steps = {}
    for trunk in ("shared", "separate", "detached"):
        policy = make_policy(observation_space, critic_trunk=trunk, intrinsic_value_head=True)
        actor = {k: v for k, v in policy.state_dict().items() if not k.startswith("critic_")}
        steps[trunk] = (policy, actor, policy.act(obs, None, None))
        if trunk == "separate":
            critic, actor_core = policy.critic_extractor, policy.features_extractor
            assert not th.equal(next(critic.parameters()), next(actor_core.parameters()))
    _, shared_actor, shared_step = steps["shared"]
    for trunk in ("separate", "detached"):
        policy, actor, step = steps[trunk]
        other = {k: v for k, v in actor.items() if not k.startswith("vf_features_extractor.")}
        base = {k: v for k, v in shared_actor.items() if not k.startswith("vf_features_")}
        assert other.keys() == base.keys()
        for key, value in base.items():
            th.testing.assert_close(other[key], value, atol=0, rtol=0, msg=key)
        th.testing.assert_close(step.actions, shared_step.actions, atol=0, rtol=0)
        th.testing.assert_close(step.log_probs, shared_step.log_probs, atol=0, rtol=0)
    # detached: the same critic, only its gradient differs
    th.testing.assert_close(steps["detached"][2].values, shared_step.values, atol=0, rtol=0)


def test_shared_critic_trunk_is_the_policy_it_was(observation_space: spaces.Dict) -> None:
    """critic_trunk='shared' (the default) keeps the parameters, state-dict keys, random
    draws and outputs of the policy before the option existed (numbers from commit 0d36257)."""
    import hashlib

    policy = make_policy(observation_space)
    keys = list(policy.state_dict())
    assert len(keys) == 242
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16] == "2379e2cb2964799e"
    total = sum(t.double().sum() for t in policy.state_dict().values())
    assert float(total) == pytest.approx(1341.972072, abs=1e-4)
    obs = random_obs(observation_space, (3,))
    th.manual_seed(1)
    with th.no_grad():
        first = policy.act(obs, None, None)
        second = policy.act(obs, first.state, None)
    assert isinstance(second.state, ThalamusState)
    assert first.actions.tolist() == [0, 4, 0] and second.actions.tolist() == [4, 2, 0]
    th.testing.assert_close(
        second.values, th.tensor([-0.455873, -0.487877, -0.302893]), atol=1e-5, rtol=0
    )
    th.testing.assert_close(
        second.log_probs, th.tensor([-1.944679, -1.945475, -1.948158]), atol=1e-5, rtol=0
    )


def test_separate_critic_state_travels_with_the_actor_state(
    observation_space: spaces.Dict,
) -> None:
    """The state of a separate critic trunk: both cores', through predict, indexing, flatten
    and masking; the critic's own state drives the values, and a state of the wrong kind is
    refused with what to pass."""
    policy = make_policy(observation_space, critic_trunk="separate")
    state = warm_state(policy, observation_space, 3)
    assert isinstance(state, ActorCriticState) and state.batch_size == 3
    assert state.critic.flatten().abs().sum() > 0
    flat = state.flatten()
    assert flat.shape == (3, 2 * state.actor.flatten().shape[1])
    th.testing.assert_close(state.unflatten(flat).flatten(), flat)
    th.testing.assert_close(state.index(1).flatten(), flat[1:2])
    th.testing.assert_close(
        ActorCriticState.cat([state.index(0), state.index(1)]).flatten(), flat[:2]
    )
    assert state.mask(th.tensor([True, False, False])).flatten()[0].abs().sum() == 0

    obs = random_obs(observation_space, (3,))
    with th.no_grad():
        carried = policy.act(obs, state, None, deterministic=True)
        # Only the critic's state zeroed: same actions, other values.
        critic_fresh = ActorCriticState(state.actor, policy.initial_state(3).critic)
        other = policy.act(obs, critic_fresh, None, deterministic=True)
        th.testing.assert_close(other.log_probs, carried.log_probs, atol=0, rtol=0)
        assert not th.allclose(other.values, carried.values)
        th.testing.assert_close(policy.predict_values(obs, state), carried.values)

    np_obs = {k: v.numpy() for k, v in obs.items()}
    actions, next_state = policy.predict(np_obs, state=state, deterministic=True)
    np.testing.assert_array_equal(actions, carried.actions.numpy())
    th.testing.assert_close(next_state.flatten(), carried.state.flatten())
    with pytest.raises(TypeError, match="ActorCriticState"):
        policy.act(obs, state.actor, None)
    shared = make_policy(observation_space)
    with pytest.raises(TypeError, match="critic_trunk is 'shared'"):
        shared.act(obs, state, None)


def test_separate_critic_trunk_save_load_and_learning_rates(
    observation_space: spaces.Dict, tmp_path: Path
) -> None:
    policy = make_policy(observation_space, critic_trunk="separate")
    keys = set(policy.state_dict())
    assert any(k.startswith("critic_extractor.") for k in keys)
    assert not any(k.startswith("vf_features_extractor.") for k in keys)
    core, heads = policy.optimizer.param_groups
    in_core = {id(p) for p in core["params"]}
    assert {id(p) for p in policy.critic_extractor.parameters()} <= in_core
    assert {id(p) for p in policy.features_extractor.parameters()} <= in_core
    assert core["lr_scale"] == policy.core_lr_scale and heads["lr_scale"] == 1.0
    path = tmp_path / "policy.pt"
    policy.save(str(path))
    loaded = ThalamusPolicy.load(str(path), device="cpu")
    assert loaded.critic_trunk == "separate"
    state = warm_state(policy, observation_space, 2)
    obs = random_obs(observation_space, (2,))
    with th.no_grad():
        a, b = policy.act(obs, state, None, True), loaded.act(obs, state, None, True)
    th.testing.assert_close(a.values, b.values)
    th.testing.assert_close(a.state.flatten(), b.state.flatten())


def test_bad_critic_trunk_is_refused_naming_the_choices(observation_space: spaces.Dict) -> None:
    with pytest.raises(ValueError, match="critic_trunk must be one of shared, separate, detached"):
        make_policy(observation_space, critic_trunk="own")
