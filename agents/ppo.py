"""ThalamusPPO: recurrent PPO (clip) whose policy carries a ``ThalamusState`` (two, as an
``ActorCriticState``, when the critic has a trunk of its own).

An SB3 :class:`~stable_baselines3.common.on_policy_algorithm.OnPolicyAlgorithm`: ``learn`` with
SB3 callbacks, logger and progress bar, ``save`` / ``load``, ``get_env`` / ``set_env`` all come
from SB3. What differs from SB3's PPO:

* the rollout carries the recurrent state and stores the state of every env at rollout start;
* a truncated episode (``TimeLimit.truncated``) is bootstrapped with the value of its terminal
  observation under the *pre-reset* state, i.e. the state after the last step of that episode;
* minibatches are whole env columns (``batch_size`` env steps = ``batch_size // n_steps`` envs
  with their full ``n_steps`` sequence), re-run from the stored state with the resets inside the
  core's scan (DESIGN rule 6);
* the core's own signals are logged under ``thalamus/*`` (averaged over
  ``THALAMUS_STATS_STEPS`` evenly spaced steps of the rollout);
* advantages are normalised over the whole rollout, by a standard deviation floored at
  ``advantage_std_floor`` (SB3: per minibatch, no floor); see the class docstring;
* optionally, an intrinsic value head learns the exploration bonus apart from the reward, with
  non-episodic returns (``intrinsic_value_head``, :mod:`agents.intrinsic`);
* optionally, a self-supervised memory loss trains the core to keep the views of the last few
  steps (``aux_past_view_coef``, :mod:`agents.past_view`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import FloatSchedule, obs_as_tensor
from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv
from stable_baselines3.common.vec_env.patch_gym import _patch_env

from agents.buffer import ThalamusRolloutBuffer, check_batch_size
from agents.constants import (
    ADVANTAGE_NORMALIZATIONS,
    INTRINSIC_DEFAULTS,
    PPO_DEFAULTS,
    THALAMUS_PPO_DEFAULTS,
    check_lags,
)
from agents.intrinsic import (
    add_intrinsic_advantages,
    check_intrinsic_settings,
    clipped_value_loss,
    intrinsic_rewards_of,
    log_ppo_update,
)
from agents.policy import PolicyState, ThalamusPolicy

__all__ = ["ADVANTAGE_NORMALIZATIONS", "ThalamusPPO"]


#: Rollout steps (of all envs) whose ``thalamus/*`` signals are averaged into the log; evenly
#: spaced. Computing them is a noticeable share of a policy step (``docs/measurements.md``),
#: so not every step pays it.
THALAMUS_STATS_STEPS = 16

SelfThalamusPPO = TypeVar("SelfThalamusPPO", bound="ThalamusPPO")


class ThalamusPPO(OnPolicyAlgorithm):
    """Proximal Policy Optimization (clip) with the recurrent :class:`ThalamusPolicy`.

    :param policy: ``"ThalamusPolicy"`` or a subclass of :class:`ThalamusPolicy`.
    :param env: the env (a Dict observation space, e.g. from ``envs.make_vec_env``) or its id.
    :param learning_rate: learning rate, or a schedule of the progress remaining (1 -> 0).
    :param n_steps: steps per env per rollout (the length of every training sequence).
    :param batch_size: env steps per minibatch; a multiple of ``n_steps`` (each minibatch is
        ``batch_size // n_steps`` whole env columns), at most ``n_steps * n_envs``.
    :param n_epochs: passes over the rollout per update.
    :param gamma: discount factor.
    :param gae_lambda: GAE lambda.
    :param clip_range: PPO clip range, or a schedule.
    :param clip_range_vf: value clip range (``None``: no value clipping), or a schedule.
    :param normalize_advantage: normalise the advantages (see the next two).
    :param advantage_normalization: ``"rollout"``: subtract the mean and divide by the standard
        deviation of the whole rollout's advantages (one scale per update); ``"minibatch"``:
        of each minibatch (SB3's PPO).
    :param advantage_std_floor: divide by ``max(std, advantage_std_floor)``, in reward units.
        Until a sparse-reward task pays its first rewards, the advantages are value-function
        noise; scaled to unit variance, they make PPO fit that noise and drop its entropy before
        it finds the goal (``docs/measurements.md``, "advantage_std_floor"). With the floor,
        noise keeps its true small scale and the entropy bonus dominates until real returns
        make the standard deviation exceed it. 0 turns it off.
    :param ent_coef: entropy bonus coefficient.
    :param vf_coef: value loss coefficient.
    :param max_grad_norm: gradient clipping norm.
    :param target_kl: stop an update early when the approximate KL exceeds ``1.5 * target_kl``.
    :param adaptive_lr_kl: scale the learning rate after every update to keep the update's
        approximate KL near this value (``None``: off): divided by 1.5 when the last epoch's KL
        exceeds twice it, multiplied by 1.5 (up to the schedule's rate) when it is below half
        of it. At a rate that suits the heads, the core moves the policy 0.05-0.3 KL per update
        once rewards arrive (PPO's MLP: ~0.01). Logged as ``train/lr_factor``; saved with the
        model, so a resumed run continues at the same rate.
    :param intrinsic_value_head: learn the exploration bonus with a second value head instead
        of in the reward (``exploration.mixing = value_head``; :mod:`agents.intrinsic`): the
        env must be wrapped by :func:`agents.exploration.wrap_exploration` with
        ``add_to_reward=False``, and the policy gets ``intrinsic_value_head=True``.
    :param intrinsic_gamma: the discount of the intrinsic return (its GAE ignores episode ends).
    :param intrinsic_adv_coef: the policy trains on ``A_ext + intrinsic_adv_coef * A_int``.
    :param aux_past_view_coef: weight of the past-view loss (:mod:`agents.past_view`) added to
        the PPO loss of every minibatch: from the core's features at step ``t`` a head predicts
        the image seen at ``t - k`` for each lag ``k``, so the core learns to keep recent views
        before the reward says they matter. 0 (the default): off, the policy has no head and
        training is exactly what it is without this argument. Logged as
        ``train/aux_past_view_loss``, ``aux/past_view_acc_lag{k}`` and
        ``aux/past_view_acc_changed_lag{k}`` (the cells that changed since ``t - k``).
    :param aux_past_view_lags: the lags ``k`` (each ``>= 1`` and ``< n_steps``); read only
        when ``aux_past_view_coef > 0``.
    :param stats_window_size: episodes averaged in ``rollout/*`` logs.
    :param tensorboard_log: tensorboard log folder (``None``: no tensorboard).
    :param policy_kwargs: :class:`ThalamusPolicy` arguments, e.g.
        ``dict(thalamus=dict(d_model=64, top_k=16), net_arch=dict(pi=[64], vf=[64]))``.
    :param verbose: 0 silent, 1 info, 2 debug.
    :param seed: random seed.
    :param device: ``"cpu"``, ``"cuda"`` or ``"auto"``.
    :param _init_setup_model: build the networks now (SB3 internal, used by ``load``).
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"ThalamusPolicy": ThalamusPolicy}
    policy: ThalamusPolicy
    rollout_buffer: ThalamusRolloutBuffer

    def __init__(
        self,
        policy: str | type[ThalamusPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = PPO_DEFAULTS["learning_rate"],
        n_steps: int = PPO_DEFAULTS["n_steps"],
        batch_size: int = PPO_DEFAULTS["batch_size"],
        n_epochs: int = PPO_DEFAULTS["n_epochs"],
        gamma: float = PPO_DEFAULTS["gamma"],
        gae_lambda: float = PPO_DEFAULTS["gae_lambda"],
        clip_range: float | Schedule = PPO_DEFAULTS["clip_range"],
        clip_range_vf: float | Schedule | None = None,
        normalize_advantage: bool = PPO_DEFAULTS["normalize_advantage"],
        advantage_normalization: str = THALAMUS_PPO_DEFAULTS["advantage_normalization"],
        advantage_std_floor: float = THALAMUS_PPO_DEFAULTS["advantage_std_floor"],
        ent_coef: float = PPO_DEFAULTS["ent_coef"],
        vf_coef: float = PPO_DEFAULTS["vf_coef"],
        max_grad_norm: float = PPO_DEFAULTS["max_grad_norm"],
        target_kl: float | None = PPO_DEFAULTS["target_kl"],
        adaptive_lr_kl: float | None = THALAMUS_PPO_DEFAULTS["adaptive_lr_kl"],
        intrinsic_value_head: bool = False,
        intrinsic_gamma: float = INTRINSIC_DEFAULTS["intrinsic_gamma"],
        intrinsic_adv_coef: float = INTRINSIC_DEFAULTS["intrinsic_adv_coef"],
        aux_past_view_coef: float = THALAMUS_PPO_DEFAULTS["aux_past_view_coef"],
        aux_past_view_lags: Sequence[int] = THALAMUS_PPO_DEFAULTS["aux_past_view_lags"],
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,
            use_sde=False,
            sde_sample_freq=-1,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
            supported_action_spaces=(
                spaces.Box,
                spaces.Discrete,
                spaces.MultiDiscrete,
                spaces.MultiBinary,
            ),
        )
        if advantage_normalization not in ADVANTAGE_NORMALIZATIONS:
            raise ValueError(
                f"advantage_normalization={advantage_normalization!r}; choose one of "
                f"{list(ADVANTAGE_NORMALIZATIONS)}."
            )
        if advantage_std_floor < 0:
            raise ValueError(
                f"advantage_std_floor={advantage_std_floor} must be >= 0 (0 turns the floor off)."
            )
        if normalize_advantage and advantage_normalization == "minibatch" and batch_size <= 1:
            raise ValueError(
                f"batch_size={batch_size} must be > 1 with normalize_advantage=True and "
                "advantage_normalization='minibatch' (advantages are normalised per minibatch)."
            )
        self.batch_size = batch_size
        self.n_epochs = n_epochs
        self.clip_range = clip_range
        self.clip_range_vf = clip_range_vf
        self.normalize_advantage = normalize_advantage
        self.advantage_normalization = advantage_normalization
        self.advantage_std_floor = advantage_std_floor
        self.target_kl = target_kl
        if adaptive_lr_kl is not None and adaptive_lr_kl <= 0:
            raise ValueError(f"adaptive_lr_kl={adaptive_lr_kl} must be > 0 (or None: off).")
        self.adaptive_lr_kl = adaptive_lr_kl
        #: Multiplier of the learning-rate schedule set by ``adaptive_lr_kl`` (1 without it).
        self.lr_factor = 1.0
        self._last_state: PolicyState | None = None
        self._stop_requested = False
        self._rollout_start_timesteps = 0
        check_intrinsic_settings(intrinsic_gamma, intrinsic_adv_coef)
        self.intrinsic_value_head = bool(intrinsic_value_head)
        self.intrinsic_gamma = float(intrinsic_gamma)
        self.intrinsic_adv_coef = float(intrinsic_adv_coef)
        if self.intrinsic_value_head:
            self.policy_kwargs = {**self.policy_kwargs, "intrinsic_value_head": True}
        if not aux_past_view_coef >= 0:
            raise ValueError(
                f"aux_past_view_coef={aux_past_view_coef} must be >= 0 (0 turns the past-view "
                "loss off)."
            )
        self.aux_past_view_coef = float(aux_past_view_coef)
        self.aux_past_view_lags = tuple(aux_past_view_lags)
        if self.aux_past_view_coef > 0:
            check_lags(self.aux_past_view_lags, n_steps)
            self.policy_kwargs = {**self.policy_kwargs, "past_view_lags": self.aux_past_view_lags}
        if _init_setup_model and self.env is not None:
            envs_per_batch = check_batch_size(batch_size, n_steps, self.n_envs)
            if self.n_envs % envs_per_batch != 0:
                warnings.warn(
                    f"batch_size={batch_size} gives {envs_per_batch} env columns per minibatch, "
                    f"which does not divide n_envs={self.n_envs}: every epoch ends with a "
                    f"truncated minibatch of {self.n_envs % envs_per_batch} env(s).",
                    stacklevel=2,
                )
        if _init_setup_model:
            self._setup_model()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _wrap_env(env: GymEnv, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:
        """SB3's wrapping (Monitor, DummyVecEnv) *without* ``VecTransposeImage``.

        The tokenizer reads images channels-last (``[H, W, C]``, one token per cell), so the
        channel-first transpose SB3 applies to CNN inputs would scramble the cells.
        """
        if not isinstance(env, VecEnv):
            env = _patch_env(env)
            if monitor_wrapper and not is_wrapped(env, Monitor):
                if verbose >= 1:
                    print("Wrapping the env with a `Monitor` wrapper")
                env = Monitor(env)
            if verbose >= 1:
                print("Wrapping the env in a DummyVecEnv.")
            env = DummyVecEnv([lambda: env])  # type: ignore[list-item, return-value]
        return env

    def _setup_model(self) -> None:
        self._setup_lr_schedule()
        self.set_random_seed(self.seed)
        self.policy = self.policy_class(  # type: ignore[assignment]
            self.observation_space, self.action_space, self.lr_schedule, **self.policy_kwargs
        )
        if not isinstance(self.policy, ThalamusPolicy):
            raise TypeError(
                f"ThalamusPPO needs a ThalamusPolicy (or subclass), got {self.policy_class}."
            )
        self.policy = self.policy.to(self.device)
        self.rollout_buffer = ThalamusRolloutBuffer(
            self.n_steps,
            self.observation_space,
            self.action_space,
            device=self.device,
            gamma=self.gamma,
            gae_lambda=self.gae_lambda,
            n_envs=self.n_envs,
        )
        self.clip_range = FloatSchedule(self.clip_range)
        if self.clip_range_vf is not None:
            if isinstance(self.clip_range_vf, (float, int)) and self.clip_range_vf <= 0:
                raise ValueError(
                    f"clip_range_vf={self.clip_range_vf} must be positive; pass None to "
                    "disable value clipping."
                )
            self.clip_range_vf = FloatSchedule(self.clip_range_vf)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "_last_state", "_stop_requested"]

    def request_stop(self) -> None:
        """Stop the update in progress after its current minibatch (SIGINT/SIGTERM): one update
        can take minutes, and a stop must not wait for it. The update is undone (parameters,
        optimizer state, counters back to the rollout's start, whose steps are uncounted), so
        the checkpoint taken on the way out is the state at that rollout's start, as for a
        stop in the middle of a rollout. The budget's last update is not stopped: it completes
        the run. Call it from a signal handler; ``learn`` then ends at the next env step
        (:class:`agents.experiment.callbacks.StopOnSignal`)."""
        self._stop_requested = True

    def set_env(self, env: GymEnv, force_reset: bool = True) -> None:
        """Set a new env (same spaces and number of envs); the state restarts from zeros.

        To continue with another number of envs, use ``ThalamusPPO.load(path, env=...)``.

        :param env: the new env.
        :param force_reset: reset the env before the next ``learn`` (SB3's default).
        """
        super().set_env(env, force_reset=force_reset)
        self._last_state = None

    def _setup_learn(
        self,
        total_timesteps: int,
        callback: MaybeCallback = None,
        reset_num_timesteps: bool = True,
        tb_log_name: str = "run",
        progress_bar: bool = False,
    ) -> tuple[int, BaseCallback]:
        check_batch_size(self.batch_size, self.n_steps, self.n_envs)
        self._stop_requested = False
        result = super()._setup_learn(
            total_timesteps, callback, reset_num_timesteps, tb_log_name, progress_bar
        )
        if self._last_state is None or self._last_state.batch_size != self.n_envs:
            self._last_state = self.policy.initial_state(self.n_envs)
        return result

    # ------------------------------------------------------------------ rollout
    def collect_rollouts(
        self,
        env: VecEnv,
        callback: BaseCallback,
        rollout_buffer: ThalamusRolloutBuffer,  # type: ignore[override]
        n_rollout_steps: int,
    ) -> bool:
        """Run the policy for ``n_rollout_steps`` steps in every env and fill the buffer.

        :param env: the training env.
        :param callback: called at every step (and at rollout start and end).
        :param rollout_buffer: the buffer to fill.
        :param n_rollout_steps: steps per env.
        :return: False if a callback stopped training.
        """
        assert self._last_obs is not None, "No previous observation was provided"
        assert self._last_state is not None, "No previous state: call learn(), not this"
        self.policy.set_training_mode(False)
        policy = self.policy
        device = self.device
        state = self._last_state
        self._rollout_start_timesteps = self.num_timesteps
        rollout_buffer.reset(initial_state=state)
        callback.on_rollout_start()

        obs = obs_as_tensor(self._last_obs, device)  # type: ignore[arg-type]
        starts_np = np.asarray(self._last_episode_starts, dtype=bool)
        stats_sum: dict[str, th.Tensor] = {}
        stats_every = max(1, n_rollout_steps // THALAMUS_STATS_STEPS)
        n_stats = 0
        n_steps = 0
        while n_steps < n_rollout_steps:
            with_stats = n_steps % stats_every == 0
            with th.no_grad():
                starts = th.as_tensor(starts_np, device=device)
                step = policy.act(obs, state, starts, with_stats=with_stats)  # type: ignore[arg-type]
            if with_stats:
                n_stats += 1
                for name, value in step.thalamus.stats.items():
                    stats_sum[name] = stats_sum[name] + value if name in stats_sum else value
            actions = step.actions.cpu().numpy()
            clipped_actions = actions
            if isinstance(self.action_space, spaces.Box):
                clipped_actions = np.clip(actions, self.action_space.low, self.action_space.high)

            new_obs, rewards, dones, infos = env.step(clipped_actions)
            self.num_timesteps += env.num_envs

            callback.update_locals(locals())
            if not callback.on_step():
                return False
            self._update_info_buffer(infos, dones)
            n_steps += 1

            rewards = self._bootstrap_truncated(rewards, dones, infos, step.state)
            rollout_buffer.add(
                obs,  # type: ignore[arg-type]
                actions,
                rewards,
                starts_np,
                step.values,
                step.log_probs,
                # The bonus of this step, with no bootstrap at a truncation: the intrinsic
                # return runs on into the env's next episode.
                intrinsic_rewards_of(infos) if self.intrinsic_value_head else None,
                step.intrinsic_values,
            )

            obs = obs_as_tensor(new_obs, device)  # type: ignore[arg-type]
            starts_np = np.asarray(dones, dtype=bool)
            state = step.state
            self._last_obs = new_obs  # type: ignore[assignment]
            self._last_episode_starts = dones
            self._last_state = state

        with th.no_grad():
            last_values, last_intrinsic = policy.predict_all_values(
                obs,
                state,
                th.as_tensor(starts_np, device=device),  # type: ignore[arg-type]
            )
        rollout_buffer.compute_returns_and_advantage(last_values=last_values, dones=dones)
        if last_intrinsic is not None:
            add_intrinsic_advantages(
                rollout_buffer,
                last_intrinsic.cpu().numpy(),
                self.intrinsic_gamma,
                self.gae_lambda,
                self.intrinsic_adv_coef,
            )
        for name, total in stats_sum.items():
            self.logger.record(f"thalamus/{name}", (total / n_stats).item())

        callback.update_locals(locals())
        callback.on_rollout_end()
        return True

    def _bootstrap_truncated(
        self,
        rewards: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
        state: PolicyState,
    ) -> np.ndarray:
        """Add ``gamma * V(terminal_obs)`` to the rewards of truncated episodes.

        The value is computed from ``state``, the state after the episode's last step, i.e.
        before the env's automatic reset (the next step's ``episode_starts`` would zero it).

        :param rewards: ``[n_envs]`` rewards of this step.
        :param dones: ``[n_envs]`` done flags of this step.
        :param infos: the VecEnv's infos (``terminal_observation``, ``TimeLimit.truncated``).
        :param state: the state after this step, before any reset.
        :return: the rewards with the bootstrap added.
        """
        truncated = [
            i
            for i, done in enumerate(dones)
            if done
            and infos[i].get("terminal_observation") is not None
            and infos[i].get("TimeLimit.truncated", False)
        ]
        if not truncated:
            return rewards
        keys = infos[truncated[0]]["terminal_observation"].keys()
        terminal_obs = {
            key: th.as_tensor(
                np.stack([infos[i]["terminal_observation"][key] for i in truncated]),
                device=self.device,
            )
            for key in keys
        }
        index = th.as_tensor(truncated, dtype=th.long, device=self.device)
        with th.no_grad():
            values = self.policy.predict_values(terminal_obs, state.index(index), None)
        rewards = rewards.copy()
        rewards[truncated] += self.gamma * values.cpu().numpy()
        return rewards

    # ------------------------------------------------------------------ update
    def _update_learning_rate(
        self, optimizers: list[th.optim.Optimizer] | th.optim.Optimizer
    ) -> None:
        """SB3's schedule times ``lr_factor`` (``adaptive_lr_kl``), times each parameter
        group's ``lr_scale`` (the policy's ``core_lr_scale`` for the core, 1 for the heads)."""
        lr = self.lr_schedule(self._current_progress_remaining) * self.lr_factor
        self.logger.record("train/learning_rate", lr)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def _undo_update(
        self, policy_state: dict[str, Any], optimizer_state: dict[str, Any], n_updates: int
    ) -> None:
        """Put back the state from before this update and uncount its rollout
        (:meth:`request_stop`)."""
        self.policy.load_state_dict(policy_state)
        self.policy.optimizer.load_state_dict(optimizer_state)
        self._n_updates = n_updates
        self.num_timesteps = self._rollout_start_timesteps
        self._update_current_progress_remaining(self.num_timesteps, self._total_timesteps)

    def _adapt_lr_factor(self, approx_kl: float) -> None:
        """One step of the KL-adaptive learning rate (``adaptive_lr_kl``), applied from the next
        update on; the factor stays within ``[1e-3, 1]`` of the schedule."""
        assert self.adaptive_lr_kl is not None
        if approx_kl > 2.0 * self.adaptive_lr_kl:
            self.lr_factor = max(self.lr_factor / 1.5, 1e-3)
        elif approx_kl < 0.5 * self.adaptive_lr_kl:
            self.lr_factor = min(self.lr_factor * 1.5, 1.0)
        self.logger.record("train/lr_factor", self.lr_factor)

    def _advantage_normalizer(self) -> Callable[[th.Tensor], th.Tensor]:
        """The map this update applies to each minibatch's advantages ``[M]``: minus the mean,
        over the standard deviation floored at ``advantage_std_floor``, both of the whole
        rollout or of the minibatch (``advantage_normalization``); identity when
        ``normalize_advantage`` is off."""
        floor = self.advantage_std_floor
        if not self.normalize_advantage:
            return lambda advantages: advantages
        if self.advantage_normalization == "rollout":
            rollout = th.as_tensor(self.rollout_buffer.advantages, device=self.device)
            shift, scale = rollout.mean(), rollout.std().clamp_min(floor) + 1e-8
            return lambda advantages: (advantages - shift) / scale

        def per_minibatch(advantages: th.Tensor) -> th.Tensor:
            if advantages.numel() < 2:
                return advantages
            return (advantages - advantages.mean()) / (advantages.std().clamp_min(floor) + 1e-8)

        return per_minibatch

    def train(self) -> None:
        """Update the policy on the current rollout (``n_epochs`` passes of env-column
        minibatches, each re-run from the stored start state with resets inside the scan)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        clip_range_vf = None
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        entropy_losses: list[float] = []
        pg_losses: list[float] = []
        value_losses: list[float] = []
        intrinsic_value_losses: list[float] = []
        past_view_losses: list[float] = []
        past_view_accuracies: list[th.Tensor] = []
        clip_fractions: list[float] = []
        approx_kl_divs: list[float] = []
        continue_training = True
        loss = th.zeros(())
        normalize_advantages = self._advantage_normalizer()
        before_update = (
            copy.deepcopy(self.policy.state_dict()),
            copy.deepcopy(self.policy.optimizer.state_dict()),
            self._n_updates,
        )
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for batch in self.rollout_buffer.get(self.batch_size):
                # The budget's last update finishes: the run is then complete.
                if self._stop_requested and self.num_timesteps < self._total_timesteps:
                    self._undo_update(*before_update)
                    return
                evaluation = self.policy.evaluate_actions(
                    batch.observations, batch.actions, batch.state, batch.episode_starts
                )
                values = evaluation.values.flatten()
                log_prob = evaluation.log_prob.flatten()
                old_log_prob = batch.old_log_prob.flatten()
                advantages = normalize_advantages(batch.advantages.flatten())

                ratio = th.exp(log_prob - old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()

                value_loss = clipped_value_loss(
                    values, batch.old_values.flatten(), batch.returns.flatten(), clip_range_vf
                )
                value_losses.append(value_loss.item())
                if evaluation.intrinsic_values is not None:
                    assert batch.old_intrinsic_values is not None
                    assert batch.intrinsic_returns is not None
                    intrinsic_value_loss = clipped_value_loss(
                        evaluation.intrinsic_values.flatten(),
                        batch.old_intrinsic_values.flatten(),
                        batch.intrinsic_returns.flatten(),
                        clip_range_vf,
                    )
                    intrinsic_value_losses.append(intrinsic_value_loss.item())
                    value_loss = value_loss + intrinsic_value_loss

                if evaluation.entropy is None:
                    entropy_loss = th.mean(log_prob)
                else:
                    entropy_loss = -th.mean(evaluation.entropy)

                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                if self.aux_past_view_coef > 0:
                    past_view = self.policy.past_view_loss(
                        evaluation.thalamus.features, batch.observations, batch.episode_starts
                    )
                    loss = loss + self.aux_past_view_coef * past_view.loss
                    past_view_losses.append(past_view.loss.item())
                    past_view_accuracies.append(
                        th.stack([past_view.accuracy, past_view.changed_accuracy])
                    )

                with th.no_grad():
                    log_ratio = log_prob - old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).item()
                    clip_fraction = th.mean((th.abs(ratio - 1) > clip_range).float()).item()
                pg_losses.append(policy_loss.item())
                entropy_losses.append(entropy_loss.item())
                clip_fractions.append(clip_fraction)
                approx_kl_divs.append(approx_kl_div)

                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(
                            f"Early stopping at step {epoch} due to reaching max kl: "
                            f"{approx_kl_div:.2f}"
                        )
                    break

                self.policy.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                self.policy.optimizer.step()

            self._n_updates += 1
            if not continue_training:
                break

        if self.adaptive_lr_kl is not None and approx_kl_divs:
            self._adapt_lr_factor(float(np.mean(approx_kl_divs)))
        log_ppo_update(
            self,
            entropy_losses=entropy_losses,
            pg_losses=pg_losses,
            value_losses=value_losses,
            approx_kl_divs=approx_kl_divs,
            clip_fractions=clip_fractions,
            loss=loss,
            clip_range=clip_range,
            clip_range_vf=clip_range_vf,
            intrinsic_value_losses=intrinsic_value_losses if self.intrinsic_value_head else None,
        )
        if past_view_losses:
            self._log_past_view(past_view_losses, past_view_accuracies)

    def _log_past_view(self, losses: list[float], accuracies: list[th.Tensor]) -> None:
        """Log the update's mean past-view loss and, per lag, the accuracy over all entries
        and over the entries that changed since ``t - k`` (``PastViewLoss``), each averaged
        over the minibatches where it is defined.

        :param losses: the loss of each minibatch.
        :param accuracies: per minibatch, ``[2, L]``: the accuracy and the changed accuracy.
        """
        self.logger.record("train/aux_past_view_loss", float(np.mean(losses)))
        per_lag = th.stack(accuracies).cpu().numpy()  # [minibatches, 2, L]
        for i, lag in enumerate(self.aux_past_view_lags):
            for which, name in enumerate(("acc", "acc_changed")):
                column = per_lag[:, which, i][~np.isnan(per_lag[:, which, i])]
                if column.size:
                    self.logger.record(f"aux/past_view_{name}_lag{lag}", float(column.mean()))

    def learn(
        self: SelfThalamusPPO,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 1,
        tb_log_name: str = "ThalamusPPO",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfThalamusPPO:
        """Train for ``total_timesteps`` env steps (SB3's ``learn``).

        :param total_timesteps: env steps to train for.
        :param callback: SB3 callback(s).
        :param log_interval: dump logs every this many rollouts.
        :param tb_log_name: tensorboard run name.
        :param reset_num_timesteps: start counting from 0 (and reset the env and state).
        :param progress_bar: show a progress bar (needs tqdm and rich).
        :return: the trained model.
        """
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )
