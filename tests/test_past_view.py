"""The past-view memory loss (``thalamus_ppo.aux_past_view_coef``, :mod:`agents.past_view`):
off is today's update, the mask, the targets, that it learns, files and resume, config errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.logger import Logger

import envs
from agents import ThalamusPPO
from agents.experiment.config import DEFAULT_CONFIG, ConfigError, load_config
from agents.experiment.model_files import load_model_file, save_model
from agents.past_view import PastViewHead, past_view_mask, past_view_targets
from tests.helpers import TINY_ROLLOUT, TINY_THALAMUS, CaptureWriter

SMALL = dict(d_model=32, d_task=16, n_heads=4, top_k=8, phase_dim=4, d_workspace=32)
TINY = [
    *TINY_ROLLOUT,
    *TINY_THALAMUS,
    "train.device=cpu",
    "train.eval_freq=0",
]


def make_model(seed: int = 0, **kwargs: Any) -> ThalamusPPO:
    venv = envs.make_vec_env("MiniGrid-DoorKey-5x5-v0", n_envs=2, seed=seed, max_steps=8)
    return ThalamusPPO(
        "ThalamusPolicy",
        venv,
        n_steps=16,
        batch_size=16,
        n_epochs=2,
        device="cpu",
        seed=seed,
        policy_kwargs=dict(thalamus=SMALL),
        **kwargs,
    )


def image_space(height: int = 2, width: int = 2, channels: int = 2) -> spaces.Box:
    return spaces.Box(0, 255, (height, width, channels), np.uint8)


# --------------------------------------------------------------------- off is today's update
def test_coef_zero_builds_no_head_and_its_update_never_calls_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aux_past_view_coef = 0 (the default): no head, no extra keys or constructor arguments
    beyond the empty lags, and train() never computes the loss."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("the past-view loss ran with aux_past_view_coef = 0")

    model = make_model(aux_past_view_coef=0.0)
    assert model.policy.past_view_head is None
    assert "past_view_lags" not in model.policy_kwargs
    assert not any("past_view" in name for name in model.policy.state_dict())
    monkeypatch.setattr(model.policy, "past_view_loss", refuse)
    model.learn(64)


def test_the_head_leaves_every_other_parameter_and_the_rollout_as_they_were() -> None:
    """With the head, every other initial parameter is the one without it (its init draws
    from a forked stream), so are the rollout's actions; and an update whose past-view loss
    contributes nothing moves the other parameters exactly as coef 0 does."""
    # Each model seeds the global random streams when it is built: build and train in turn.
    plain = make_model()
    plain_state = {k: v.clone() for k, v in plain.policy.state_dict().items()}
    plain.learn(64)
    with_head = make_model(aux_past_view_coef=0.5)
    head_state = with_head.policy.state_dict()
    extra = set(head_state) - set(plain_state)
    assert extra and all(name.startswith("past_view_head.") for name in extra)
    for name, tensor in plain_state.items():
        assert th.equal(tensor, head_state[name]), name
    # Zero weight through the same code path: the other parameters must end where coef 0 ends.
    with_head.aux_past_view_coef = 0.0
    with_head.learn(64)
    assert np.array_equal(plain.rollout_buffer.actions, with_head.rollout_buffer.actions)
    after_plain, after_head = plain.policy.state_dict(), with_head.policy.state_dict()
    for name, tensor in after_plain.items():
        assert th.equal(tensor, after_head[name]), name


def test_the_loss_reaches_the_core_and_changes_the_update() -> None:
    """coef > 0 changes the core's parameters after an update (the gradient reaches it), and
    the update logs the loss and each lag's accuracy."""
    plain = make_model()
    plain.learn(64)
    aux = make_model(aux_past_view_coef=1.0, aux_past_view_lags=[1, 2])
    writer = CaptureWriter()
    aux.set_logger(Logger(folder=None, output_formats=[writer]))
    aux.learn(64)
    core = [n for n in plain.policy.state_dict() if n.startswith("features_extractor.core.")]
    changed = [
        n for n in core if not th.equal(plain.policy.state_dict()[n], aux.policy.state_dict()[n])
    ]
    assert changed
    keys = set().union(*writer.records)
    assert {
        "train/aux_past_view_loss",
        "aux/past_view_acc_lag1",
        "aux/past_view_acc_lag2",
        "aux/past_view_acc_changed_lag1",
    } <= keys
    for record in writer.records:
        for key in ("aux/past_view_acc_lag1", "aux/past_view_acc_lag2"):
            if key in record:
                assert 0.0 <= record[key] <= 1.0


# --------------------------------------------------------------------------- mask and targets
def test_the_mask_drops_lags_that_cross_an_episode_or_the_sequence_start() -> None:
    # One env, 6 steps, an episode starts at step 3 (and at 0: ignored, nothing before it).
    starts = th.tensor([[True, False, False, True, False, False]])
    # lag 1: steps 1..5 -> valid unless step t starts an episode (t = 3).
    assert past_view_mask(starts, 1).tolist() == [[True, True, False, True, True]]
    # lag 2: steps 2..5 -> t - 2 in the same episode: t = 2 (0), 5 (3); not 3 (1), 4 (2).
    assert past_view_mask(starts, 2).tolist() == [[True, False, False, True]]
    # lag 4: steps 4, 5 -> 0 and 1 are in the episode before: nothing.
    assert past_view_mask(starts, 4).tolist() == [[False, False]]


def test_the_targets_are_the_views_lag_steps_back() -> None:
    # Two envs, 5 steps; the value seen by env b at step t is 10 * b + t.
    starts = th.tensor([[False, False, False, False, False], [False, False, True, False, False]])
    seen = (10 * th.arange(2)[:, None] + th.arange(5)[None, :]).float()
    valid, targets = past_view_targets(seen, starts, 2)
    # Env 0: steps 2, 3, 4 see 0, 1, 2. Env 1: the episode starting at step 2 leaves only
    # step 4, which sees step 2 (12).
    assert valid.tolist() == [[True, True, True], [False, False, True]]
    assert targets.tolist() == [0.0, 1.0, 2.0, 12.0]
    valid, targets = past_view_targets(seen, starts, 5)
    assert valid.shape == (2, 0) and targets.numel() == 0


def test_a_lag_across_an_episode_start_adds_no_loss_and_no_gradient() -> None:
    """Features at steps whose lag crosses an episode start (or the sequence start) get no
    gradient; when no step of a lag has a target, the lag adds 0 and its accuracy is NaN."""
    th.manual_seed(0)
    head = PastViewHead(8, image_space(), lags=[2, 4])
    features = th.randn(1, 5, 8, requires_grad=True)
    images = th.randint(0, 4, (1, 5, 2, 2, 2))
    starts = th.tensor([[False, False, False, True, False]])  # an episode starts at step 3
    out = head(features, images, starts)
    out.loss.backward()
    assert features.grad is not None
    # lag 2: only step 2 (sees 0) is valid (3 and 4 cross the start); lag 4: step 4 crosses it.
    assert out.n_valid.tolist() == [1, 0]
    assert th.isnan(out.accuracy[1]) and not th.isnan(out.accuracy[0])
    touched = features.grad.abs().sum(-1)[0]
    assert touched[2] > 0
    assert th.all(touched[[0, 1, 3, 4]] == 0)
    # The loss is lag 2's alone, halved by the mean over the two lags.
    only_lag2 = PastViewHead(8, image_space(), lags=[2])
    only_lag2.load_state_dict(
        {
            "cells.weight": head.cells.weight.view(2, -1, 8)[0],
            "cells.bias": head.cells.bias.view(2, -1)[0],
            **{k: v for k, v in head.state_dict().items() if k.startswith("classifiers.")},
        }
    )
    assert th.allclose(out.loss, only_lag2(features, images, starts).loss / 2)


def test_the_loss_learns_the_view_one_step_back_and_only_what_the_features_hold() -> None:
    """Toy sequences of random images whose features are the previous step's image, one-hot:
    lag 1 is learnable to ~100%, lag 2 is not (the features do not hold it). A head reading
    the wrong steps (t - k + 1, t - k - 1) cannot get lag 1 right."""
    th.manual_seed(0)
    # Two cells, one channel: nine different features, too few to memorise lag 2 through.
    space = image_space(1, 2, 1)
    values = 3
    batch, steps = 32, 12
    images = th.randint(0, values, (batch, steps, 1, 2, 1))
    previous = th.roll(images, 1, dims=1)
    features = th.nn.functional.one_hot(previous, values).float().reshape(batch, steps, -1)
    starts = th.zeros(batch, steps, dtype=th.bool)
    starts[:, 0] = True
    head = PastViewHead(features.shape[-1], space, lags=[1, 2])
    optimizer = th.optim.Adam(head.parameters(), lr=0.03)
    first = head(features, images, starts)
    for _ in range(150):
        optimizer.zero_grad()
        head(features, images, starts).loss.backward()
        optimizer.step()
    last = head(features, images, starts)
    assert last.loss < 0.6 * first.loss
    assert last.accuracy[0] > 0.99
    assert last.accuracy[1] < 0.6  # chance is 1/3: nothing to learn at lag 2


# -------------------------------------------------------------------------- files and resume
def _tiny_config(tmp_path: Path, *extra: str) -> Any:
    return load_config(
        DEFAULT_CONFIG,
        [
            *TINY,
            "thalamus_ppo.aux_past_view_coef=0.1",
            "thalamus_ppo.aux_past_view_lags=[1,3]",
            f"train.runs_dir={tmp_path}",
            *extra,
        ],
    )


def test_a_model_file_keeps_the_head_its_optimizer_state_and_settings(tmp_path: Path) -> None:
    from agents.experiment.training import build_agent

    config = _tiny_config(tmp_path)
    venv = envs.make_vec_env(config.env.id, n_envs=2, seed=0)
    model = build_agent(config, venv)
    model.learn(64)
    venv.close()
    save_model(model, tmp_path / "m.safetensors")
    loaded = load_model_file(tmp_path / "m.safetensors", device="cpu")
    assert loaded.aux_past_view_coef == 0.1 and loaded.aux_past_view_lags == (1, 3)
    assert loaded.policy.past_view_head is not None
    assert loaded.policy.past_view_head.lags == (1, 3)
    for (name, a), (other, b) in zip(
        model.policy.state_dict().items(), loaded.policy.state_dict().items(), strict=True
    ):
        assert name == other and th.equal(a, b), name
    saved, restored = model.policy.optimizer.state_dict(), loaded.policy.optimizer.state_dict()
    assert len(saved["state"]) == len(list(model.policy.parameters())) == len(restored["state"])


def test_a_run_with_the_loss_resumes_and_cannot_change_it(tmp_path: Path) -> None:
    from agents.experiment.training import resume, train

    config = _tiny_config(
        tmp_path,
        "train.checkpoint_freq=32",
        "train.total_timesteps=32",
        "train.progress=none",
    )
    run = train(config)
    for override in ("thalamus_ppo.aux_past_view_coef=0", "thalamus_ppo.aux_past_view_lags=[1]"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            resume(run, [override], total_timesteps=64)
    resume(run, total_timesteps=64)
    final = load_model_file(run / "final_model.safetensors", device="cpu")
    assert final.num_timesteps == 64 and final.policy.past_view_head is not None


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["thalamus_ppo.aux_past_view_coef=-0.1"], r"aux_past_view_coef = -0\.1.*>= 0"),
        (
            ["thalamus_ppo.aux_past_view_coef=0.1", "thalamus_ppo.aux_past_view_lags=[]"],
            r"thalamus_ppo\.aux_past_view_lags is empty.*aux_past_view_coef = 0",
        ),
        (
            ["thalamus_ppo.aux_past_view_coef=0.1", "thalamus_ppo.aux_past_view_lags=[0,2]"],
            r"aux_past_view_lags = \[0, 2\].*integer >= 1",
        ),
        (
            ["thalamus_ppo.aux_past_view_coef=0.1", "thalamus_ppo.aux_past_view_lags=[2,2]"],
            r"repeats a lag",
        ),
        (
            [
                "thalamus_ppo.aux_past_view_coef=0.1",
                "ppo.n_steps=16",
                "ppo.batch_size=32",
                "thalamus_ppo.aux_past_view_lags=[1,16]",
            ],
            r"lag >= n_steps = 16.*Use lags < 16",
        ),
    ],
)
def test_bad_past_view_settings_are_refused_saying_what_to_do(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(DEFAULT_CONFIG, overrides)


def test_lags_are_not_checked_while_the_loss_is_off() -> None:
    """coef 0: the lags are unread, so a short ppo.n_steps with the default lags still runs."""
    config = load_config(DEFAULT_CONFIG, ["ppo.n_steps=8", "ppo.batch_size=16"])
    assert config.thalamus_ppo.aux_past_view_lags == [1, 2, 4, 8]


def test_the_algorithm_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="aux_past_view_coef=-1.0 must be >= 0"):
        make_model(aux_past_view_coef=-1.0)
    with pytest.raises(ValueError, match="lag >= n_steps = 16"):
        make_model(aux_past_view_coef=0.1, aux_past_view_lags=[16])


def test_a_policy_without_an_image_refuses_the_head() -> None:
    from agents.policy import ThalamusPolicy

    space = spaces.Dict({"direction": spaces.Discrete(4)})
    with pytest.raises(ValueError, match="no integer \\[H, W, C\\] image"):
        ThalamusPolicy(
            space,
            spaces.Discrete(3),
            lambda _: 1e-3,
            thalamus={**SMALL, "top_k": 1},
            past_view_lags=(1,),
        )


def test_changed_accuracy_counts_only_what_moved_since_the_past_view() -> None:
    """A head that always answers 1: on a cell that always shows 1 it is right without memory
    (in ``accuracy``, not in ``changed_accuracy``); on a cell alternating 0, 1 every step
    every lag-1 entry changed and half are right."""
    head = PastViewHead(4, image_space(1, 2, 1), lags=[1])
    with th.no_grad():
        head.cells.weight.zero_()
        head.cells.bias.zero_()
        head.classifiers[0].bias.zero_()
        head.classifiers[0].bias[1] = 5.0
    steps = 9
    images = th.zeros(1, steps, 1, 2, 1, dtype=th.uint8)
    images[0, :, 0, 0, 0] = 1
    images[0, :, 0, 1, 0] = th.arange(steps) % 2
    out = head(th.randn(1, steps, 4), images, th.zeros(1, steps, dtype=th.bool))
    assert out.accuracy.tolist() == [0.75]
    assert out.changed_accuracy is not None and out.changed_accuracy.tolist() == [0.5]
