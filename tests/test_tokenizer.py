"""Tokenizer: built from the observation space, token layout contract, masks, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

import envs
from agents.tokenizer import Tokenizer, classify_observation_space, summed_embedding, symlog

H, W, L = 7, 7, 6


def contract_space(n_actions: int = 7, vocab: int = 20, trial_episodes: int = 1) -> spaces.Dict:
    """The observation contract between envs/ and agents/, built by hand."""
    return spaces.Dict(
        {
            "image": spaces.Box(0, 255, (H, W, 3), np.uint8),
            "direction": spaces.Discrete(4),
            "mission": spaces.Box(0, vocab - 1, (L,), np.int64),
            "prev_action": spaces.Discrete(n_actions + 1),
            "prev_reward": spaces.Box(-np.inf, np.inf, (1,), np.float32),
            "episode_return": spaces.Box(-np.inf, np.inf, (1,), np.float32),
            "last_episode_return": spaces.Box(-np.inf, np.inf, (1,), np.float32),
            "trial_episode": spaces.Discrete(trial_episodes),
        }
    )


def sample_batch(space: spaces.Dict, shape: tuple[int, ...], seed: int = 0) -> dict[str, th.Tensor]:
    """Random observations with leading ``shape``, in the dtypes a VecEnv delivers."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    out = {}
    for key, sub in space.spaces.items():
        if isinstance(sub, spaces.Discrete):
            x = rng.integers(sub.start, sub.start + sub.n, size=n)
        elif key == "image":
            x = np.stack([rng.integers(0, 11, size=sub.shape) for _ in range(n)]).astype(np.uint8)
        elif key == "mission":
            x = rng.integers(1, int(sub.high.max()) + 1, size=(n, *sub.shape))
            lengths = rng.integers(1, sub.shape[0] + 1, size=n)
            lengths[0] = sub.shape[0]  # one full-length mission: every word slot is in use
            x[np.arange(sub.shape[0])[None, :] >= lengths[:, None]] = 0
        else:
            x = rng.normal(size=(n, *sub.shape)).astype(np.float32)
        out[key] = th.as_tensor(x).reshape(*shape, *sub.shape)
    return out


@pytest.fixture
def tokenizer() -> Tokenizer:
    th.manual_seed(0)
    return Tokenizer(contract_space(), d_model=32, d_task=16)


def test_layout_matches_the_contract(tokenizer: Tokenizer) -> None:
    layout = tokenizer.token_layout
    assert layout.grid_shape == (H, W)
    assert layout.image == slice(0, H * W)
    assert layout.proprio == H * W
    assert layout.mission == slice(H * W + 1, H * W + 1 + L)
    assert layout.n_tokens == H * W + 1 + L
    assert layout.image_key == "image" and layout.mission_key == "mission"
    # Float entries become the feedback vector, in the space's (sorted) key order.
    assert tokenizer.feedback_keys == ("episode_return", "last_episode_return", "prev_reward")
    assert tokenizer.discrete_keys == ("direction", "prev_action", "trial_episode")


def test_shapes_dtypes_and_feedback(tokenizer: Tokenizer) -> None:
    obs = sample_batch(contract_space(), (5,))
    out = tokenizer(obs)
    n = tokenizer.n_tokens
    assert out.tokens.shape == (5, n, 32) and out.tokens.dtype == th.float32
    assert out.token_mask.shape == (5, n) and out.token_mask.dtype == th.bool
    assert out.task.shape == (5, 16)
    assert out.positions.shape == (5, n, 2)
    expected = th.cat(
        [obs["episode_return"], obs["last_episode_return"], obs["prev_reward"]], dim=1
    )
    th.testing.assert_close(out.feedback, expected)  # raw, not normalised


def test_cell_token_j_is_cell_j_row_major(tokenizer: Tokenizer) -> None:
    """Changing image cell (r, c) changes token r * W + c and no other token."""
    obs = sample_batch(contract_space(), (1,))
    base = tokenizer(obs).tokens[0]
    for r, c in [(0, 0), (2, 5), (6, 1), (6, 6)]:
        changed = {k: v.clone() for k, v in obs.items()}
        changed["image"][0, r, c, 0] = (int(changed["image"][0, r, c, 0]) + 1) % 11
        tokens = tokenizer(changed).tokens[0]
        differs = (tokens - base).abs().amax(-1) > 1e-6
        assert differs.nonzero().flatten().tolist() == [r * W + c]


def test_positions(tokenizer: Tokenizer) -> None:
    out = tokenizer(sample_batch(contract_space(), (2,)))
    pos = out.positions[0]
    for j in (0, 9, 48):
        r, c = divmod(j, W)
        th.testing.assert_close(pos[j], th.tensor([r / (H - 1), c / (W - 1)]))
    assert (pos[H * W :] == 0).all()  # words and proprio are not spatial


def test_mission_padding_mask_and_task_pooling(tokenizer: Tokenizer) -> None:
    obs = sample_batch(contract_space(), (4,))
    out = tokenizer(obs)
    layout = tokenizer.token_layout
    th.testing.assert_close(out.token_mask[:, layout.mission], obs["mission"] != 0)
    assert out.token_mask[:, layout.image].all() and out.token_mask[:, layout.proprio].all()
    # The task vector depends on the words only: changing the image leaves it unchanged,
    # changing a valid word changes it.
    other = {k: v.clone() for k, v in obs.items()}
    other["image"] = (other["image"] + 1) % 11
    th.testing.assert_close(tokenizer(other).task, out.task)
    other["mission"][:, 0] = other["mission"][:, 0] % 19 + 1
    assert not th.allclose(tokenizer(other).task, out.task)


def test_word_slots_that_are_padding_in_every_row_are_dropped_exactly() -> None:
    """A batch of short missions gets ``H*W + 1 + longest`` tokens, and the core computes the
    same function as on the full-width token set (the dropped slots are masked padding)."""
    from thalamus_rl import ThalamusConfig, ThalamusCore

    th.manual_seed(0)
    tokenizer = Tokenizer(contract_space(), d_model=32, d_task=16)
    obs = sample_batch(contract_space(), (2, 5), seed=3)
    obs["mission"][..., 3:] = 0
    obs["mission"][..., :2] = obs["mission"][..., :2].clamp_min(1)
    out = tokenizer(obs)
    n_short = H * W + 1 + 3
    assert out.tokens.shape[-2] == out.token_mask.shape[-1] == out.positions.shape[-2] == n_short
    th.testing.assert_close(out.token_mask[..., H * W + 1 :], obs["mission"][..., :3] != 0)

    # The full-width token set: the same tokens followed by masked (arbitrary) word slots.
    pad = tokenizer.n_tokens - n_short
    full_tokens = th.cat([out.tokens, th.randn(2, 5, pad, 32)], dim=-2)
    full_mask = th.cat([out.token_mask, th.zeros(2, 5, pad, dtype=th.bool)], dim=-1)
    full_pos = tokenizer.positions.expand(2, 5, tokenizer.n_tokens, 2)
    core = ThalamusCore(ThalamusConfig(d_model=32, d_task=16, top_k=8, n_heads=4, d_workspace=32))
    starts = th.zeros(2, 5, dtype=th.bool)
    short, _ = core(out.tokens, out.token_mask, out.task, out.feedback, out.positions, None, starts)
    full, _ = core(full_tokens, full_mask, out.task, out.feedback, full_pos, None, starts)
    th.testing.assert_close(short.features, full.features)
    th.testing.assert_close(short.indices, full.indices)
    th.testing.assert_close(short.salience, full.salience[..., :n_short])


def test_sequence_batch_equals_flat_batch(tokenizer: Tokenizer) -> None:
    """[B, T] leading dims give exactly the per-step result (the tokenizer is per step)."""
    obs = sample_batch(contract_space(), (3, 4))
    seq = tokenizer(obs)
    flat = tokenizer({k: v.reshape(12, *v.shape[2:]) for k, v in obs.items()})
    for a, b in zip(seq, flat, strict=True):
        th.testing.assert_close(a.reshape(b.shape), b)


def test_float_copies_of_integer_entries_give_the_same_tokens(tokenizer: Tokenizer) -> None:
    obs = sample_batch(contract_space(), (3,))
    as_float = {k: v.float() for k, v in obs.items()}
    th.testing.assert_close(tokenizer(as_float).tokens, tokenizer(obs).tokens)


def test_max_word_tokens_keeps_the_first_slots_and_pools_all_words() -> None:
    full = Tokenizer(contract_space(), d_model=32, d_task=16)
    short = Tokenizer(contract_space(), d_model=32, d_task=16, max_word_tokens=2)
    weights = full.state_dict()
    weights["word_position.weight"] = weights["word_position.weight"][:2]
    short.load_state_dict(weights)
    assert short.token_layout.mission == slice(H * W + 1, H * W + 3)
    assert short.token_layout.n_tokens == H * W + 1 + 2
    obs = sample_batch(contract_space(), (4,))
    a, b = full(obs), short(obs)
    th.testing.assert_close(b.task, a.task)  # pooled over every word
    th.testing.assert_close(b.token_mask[:, short.token_layout.mission], obs["mission"][:, :2] != 0)
    with pytest.raises(ValueError, match="max_word_tokens=-1"):
        Tokenizer(contract_space(), d_model=8, d_task=4, max_word_tokens=-1)


def test_discrete_start_offset() -> None:
    space = spaces.Dict({"x": spaces.Discrete(3, start=-1), "r": spaces.Box(-1, 1, (2,))})
    tok = Tokenizer(space, d_model=8, d_task=4, feedback_keys={"r"})
    out = tok({"x": th.tensor([-1, 0, 1]), "r": th.zeros(3, 2)})
    assert out.tokens.shape == (3, 1, 8)  # just the proprio token
    assert out.feedback.shape == (3, 2)
    assert not th.allclose(out.tokens[0], out.tokens[2])


def test_space_without_float_entries_gets_one_zero_feedback_signal() -> None:
    space = spaces.Dict({"image": spaces.Box(0, 4, (3, 3, 2), np.uint8)})
    tok = Tokenizer(space, d_model=8, d_task=4)
    out = tok({"image": th.zeros(2, 3, 3, 2, dtype=th.uint8)})
    assert tok.feedback_dim == 1
    assert out.feedback.shape == (2, 1) and (out.feedback == 0).all()
    assert out.task.shape == (2, 4)


@pytest.mark.parametrize("with_feedback", [True, False], ids=["feedback", "no-feedback"])
def test_a_double_tokenizer_returns_float64_throughout(with_feedback: bool) -> None:
    space = contract_space()
    if not with_feedback:
        space = spaces.Dict({"image": space["image"], "direction": space["direction"]})
    tok = Tokenizer(space, d_model=8, d_task=4).double()
    out = tok(sample_batch(space, (3,)))
    assert out.tokens.dtype == out.task.dtype == out.feedback.dtype == th.float64


def test_every_parameter_gets_gradient(tokenizer: Tokenizer) -> None:
    out = tokenizer(sample_batch(contract_space(), (6,)))
    (out.tokens.square().sum() + out.task.square().sum()).backward()
    for name, param in tokenizer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (spaces.Box(0, 1, (4,)), "Dict observation space"),
        (spaces.Dict({"text": spaces.Text(10)}), "'text'"),
        (spaces.Dict({"rgb": spaces.Box(0.0, 1.0, (8, 8, 3))}), "'rgb'"),
        (
            spaces.Dict(
                {
                    "a": spaces.Box(0, 255, (7, 7, 3), np.uint8),
                    "b": spaces.Box(0, 255, (7, 7, 3), np.uint8),
                }
            ),
            "exactly one image",
        ),
        (spaces.Dict({"words": spaces.Box(0, 9, (5,), np.int64)}), "'words'"),
        (spaces.Dict({"image": spaces.Box(-1, 5, (3, 3, 1), np.int64)}), "negative"),
    ],
)
def test_unsupported_spaces_get_a_clear_error(space: spaces.Space, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        classify_observation_space(space)
    with pytest.raises((TypeError, ValueError), match=message):
        Tokenizer(space, d_model=8, d_task=4)


def test_summed_embedding_equals_embedding_bag_in_value_and_gradient() -> None:
    """The tokenizer's index_add backward computes what nn.EmbeddingBag's does, repeated
    rows included (a grid holds the same object in many cells)."""
    th.manual_seed(0)
    bag = th.nn.EmbeddingBag(30, 8, mode="sum").double()
    index = th.stack([th.randint(0, 5, (200,)), 10 + th.randint(0, 3, (200,))], dim=1)
    grad = th.randn(200, 8, dtype=th.float64)
    ours = summed_embedding(bag.weight, index)
    (weight_grad,) = th.autograd.grad(ours, bag.weight, grad)
    reference = bag(index)
    (reference_grad,) = th.autograd.grad(reference, bag.weight, grad)
    th.testing.assert_close(ours, reference)
    th.testing.assert_close(weight_grad, reference_grad)
    assert th.autograd.gradcheck(lambda w: summed_embedding(w, index[:6]), bag.weight)


def test_symlog() -> None:
    x = th.tensor([-10.0, -1.0, 0.0, 1.0, 10.0])
    th.testing.assert_close(symlog(x), th.sign(x) * th.log(1 + x.abs()))


def test_a_float_box_that_no_wrapper_declares_is_refused_not_read_as_feedback() -> None:
    """Any float Box used to become a reward-feedback signal: a new wrapper's float key
    silently widened the FeedbackLayer's input. Now only declared keys are feedback."""
    space = spaces.Dict(
        {
            "image": spaces.Box(0, 255, (7, 7, 3), np.uint8),
            "prev_reward": spaces.Box(-np.inf, np.inf, (1,), np.float32),
            "battery": spaces.Box(0.0, 1.0, (1,), np.float32),
        }
    )
    with pytest.raises(ValueError, match="'battery'.*declare_feedback_keys"):
        classify_observation_space(space)
    keys = classify_observation_space(space, feedback_keys={"prev_reward", "battery"})
    assert keys.feedback_keys == ("battery", "prev_reward") and keys.feedback_dim == 2


def test_the_env_wrappers_declare_the_feedback_keys_their_observations_carry() -> None:
    env = envs.make_env("MiniGrid-DoorKey-5x5-v0", trial_episodes=2)
    try:
        keys = classify_observation_space(env.observation_space)
    finally:
        env.close()
    assert set(keys.feedback_keys) == envs.feedback_keys()
    with pytest.raises(ValueError, match="already declared by RewardFeedbackWrapper"):
        envs.declare_feedback_keys("AnotherWrapper", "prev_reward")
