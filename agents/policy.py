"""ThalamusPolicy: tokenizer -> ThalamusCore -> actor and critic heads over one shared core.

With ``critic_trunk="separate"`` the critic has a tokenizer and core of its own (PPG's and SB3's
``share_features_extractor=False`` practice): the policy then carries an
:class:`ActorCriticState`, the two cores' states, wherever it would carry one
``ThalamusState``; with ``"detached"`` the critic reads the actor core's features with the
gradient stopped.

The policy reuses SB3's ``ActorCriticPolicy`` for what is not recurrent (action distributions,
the MLP heads, the optimizer, ``obs_to_tensor``, save/load of the policy alone) and replaces the
forward passes by recurrent ones that carry one :class:`thalamus_rl.ThalamusState`:

* :meth:`ThalamusPolicy.act` — one step of ``B`` envs (rollouts, evaluation, videos), returns a
  :class:`PolicyStep` with the step's :class:`thalamus_rl.ThalamusOutput`;
* :meth:`ThalamusPolicy.evaluate_actions` — whole sequences ``[B, T]`` from a stored state with
  episode starts inside the scan (PPO's update); everything above the core runs once on all
  ``B*T`` steps;
* :meth:`ThalamusPolicy.predict` — sb3-contrib's recurrent contract
  ``predict(obs, state=None, episode_start=None, deterministic=False) -> (actions, state)``, so
  ``stable_baselines3.common.evaluation.evaluate_policy`` works unchanged (the state is opaque to
  it; ``None`` means zeros).

``episode_starts`` always means "this observation is the first of a new episode": the core zeroes
the state before processing it, so callers never mask by hand.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import Distribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from agents.constants import CRITIC_TRUNKS, DEFAULT_CORE_LR_SCALE
from agents.past_view import PastViewHead, PastViewLoss
from agents.selection import slot_kind_stats
from agents.tokenizer import TokenizedObs, Tokenizer, classify_observation_space
from thalamus_rl import ThalamusConfig, ThalamusCore, ThalamusOutput, ThalamusState

__all__ = [
    "ADAM_EPS",
    "CRITIC_TRUNKS",
    "ActorCriticState",
    "DEFAULT_CORE_LR_SCALE",
    "PolicyState",
    "PolicyStep",
    "SequenceEvaluation",
    "ThalamusExtractor",
    "ThalamusPolicy",
    "make_thalamus_config",
]


class ActorCriticState(NamedTuple):
    """The state of a policy whose critic has its own core (``critic_trunk="separate"``).

    A pytree of two :class:`~thalamus_rl.ThalamusState` with the same methods, so the rollout,
    the buffer (which stores it at rollout start and indexes it by env), the truncation
    bootstrap and evaluation carry it as they carry one core's state.

    :param actor: the actor core's state.
    :param critic: the critic core's state (same batch).
    """

    actor: ThalamusState
    critic: ThalamusState

    @property
    def batch_size(self) -> int:
        return self.actor.batch_size

    def map(self, fn: Callable[[th.Tensor], th.Tensor]) -> ActorCriticState:
        """Apply ``fn`` to every tensor leaf of both states."""
        return ActorCriticState(self.actor.map(fn), self.critic.map(fn))

    def detach(self) -> ActorCriticState:
        return ActorCriticState(self.actor.detach(), self.critic.detach())

    def to(self, device: th.device | str) -> ActorCriticState:
        return ActorCriticState(self.actor.to(device), self.critic.to(device))

    def clone(self) -> ActorCriticState:
        return ActorCriticState(self.actor.clone(), self.critic.clone())

    def index(self, idx: th.Tensor | slice | int) -> ActorCriticState:
        """Both states of the envs selected by ``idx`` (an int keeps the batch dim)."""
        return ActorCriticState(self.actor.index(idx), self.critic.index(idx))

    def mask(self, episode_starts: th.Tensor) -> ActorCriticState:
        """Zero both states of the envs whose observation starts an episode (``[B]`` bool)."""
        return ActorCriticState(self.actor.mask(episode_starts), self.critic.mask(episode_starts))

    @staticmethod
    def cat(states: list[ActorCriticState]) -> ActorCriticState:
        """Concatenate states along the batch."""
        return ActorCriticState(
            ThalamusState.cat([s.actor for s in states]),
            ThalamusState.cat([s.critic for s in states]),
        )

    def flatten(self) -> th.Tensor:
        """``[B, S_actor + S_critic]``: the actor's flat state, then the critic's."""
        return th.cat([self.actor.flatten(), self.critic.flatten()], dim=1)

    def unflatten(self, flat: th.Tensor) -> ActorCriticState:
        """Rebuild a state shaped like ``self`` (any batch size) from :meth:`flatten`'s output."""
        width = self.actor.flatten().shape[1]
        return ActorCriticState(
            self.actor.unflatten(flat[:, :width]), self.critic.unflatten(flat[:, width:])
        )


#: What :class:`ThalamusPolicy` carries from step to step: one core's state, or with
#: ``critic_trunk="separate"`` the actor's and the critic's.
PolicyState = ThalamusState | ActorCriticState


class PolicyStep(NamedTuple):
    """One policy step of ``B`` envs.

    :param actions: ``[B, *action_shape]`` sampled (or deterministic) actions.
    :param values: ``[B]`` value estimates.
    :param log_probs: ``[B]`` log-probabilities of ``actions``.
    :param state: the state after this step (to feed to the next one).
    :param thalamus: the (actor's) core's output for this step (leading dim ``[B]``).
    :param intrinsic_values: ``[B]`` the intrinsic value head's estimates (``None``: the policy
        has no intrinsic head).
    """

    actions: th.Tensor
    values: th.Tensor
    log_probs: th.Tensor
    state: PolicyState
    thalamus: ThalamusOutput
    intrinsic_values: th.Tensor | None = None


class SequenceEvaluation(NamedTuple):
    """The policy's evaluation of stored actions over ``[B, T]`` sequences.

    :param values: ``[B, T]`` value estimates.
    :param log_prob: ``[B, T]`` log-probabilities of the given actions.
    :param entropy: ``[B, T]`` entropies of the action distributions (``None`` where the
        distribution has no closed form).
    :param thalamus: the (actor's) core's output (leading dims ``[B, T]``).
    :param intrinsic_values: ``[B, T]`` the intrinsic value head's estimates (``None``: the
        policy has no intrinsic head).
    """

    values: th.Tensor
    log_prob: th.Tensor
    entropy: th.Tensor | None
    thalamus: ThalamusOutput
    intrinsic_values: th.Tensor | None = None


def make_thalamus_config(
    thalamus: Mapping[str, Any] | ThalamusConfig | None, n_feedback_signals: int
) -> ThalamusConfig:
    """Build the core's config from user settings plus what the observation space dictates.

    :param thalamus: ``ThalamusConfig`` fields (a dict, as stored in ``policy_kwargs``) or a
        config; ``None`` for the defaults.
    :param n_feedback_signals: width of the tokenizer's feedback vector.
    :return: the config with ``n_feedback_signals`` filled in.
    """
    if isinstance(thalamus, ThalamusConfig):
        settings = dataclasses.asdict(thalamus)
    else:
        settings = dict(thalamus or {})
    field_names = {f.name for f in dataclasses.fields(ThalamusConfig)}
    unknown = sorted(set(settings) - field_names)
    if unknown:
        raise ValueError(
            f"Unknown thalamus setting(s) {unknown} in policy_kwargs['thalamus']; valid fields "
            f"of ThalamusConfig: {sorted(field_names)}."
        )
    given = settings.get("n_feedback_signals")
    if given is not None and given != n_feedback_signals:
        raise ValueError(
            f"policy_kwargs['thalamus']['n_feedback_signals']={given} disagrees with the "
            f"observation space, which has {n_feedback_signals} float feedback signal(s). "
            "Leave it out: the policy sets it from the space."
        )
    settings["n_feedback_signals"] = n_feedback_signals
    return ThalamusConfig(**settings)


class ThalamusExtractor(BaseFeaturesExtractor):
    """The recurrent feature extractor: :class:`Tokenizer` followed by ``ThalamusCore``.

    Unlike SB3's extractors it carries a state, so it has no stateless ``forward``; use
    :meth:`step` (one step) or :meth:`sequence` (``[B, T]`` sequences).

    :param observation_space: the Dict observation space.
    :param thalamus: ``ThalamusConfig`` fields (``n_feedback_signals`` comes from the space).
    :param tokenizer: extra :class:`Tokenizer` arguments (e.g. ``mission_key``); its widths
        are the core's ``d_model`` and ``d_task``.
    :param compile_core: run the core through ``torch.compile`` (inductor) in the calls that
        pass ``compiled=True`` (:class:`ThalamusPolicy` does in rollouts and updates). The
        eager core is the reference; the tokenizer always runs eagerly (its output width
        depends on the data).
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        thalamus: Mapping[str, Any] | None = None,
        tokenizer: Mapping[str, Any] | None = None,
        compile_core: bool = False,
    ) -> None:
        tokenizer = dict(tokenizer or {})
        keys = classify_observation_space(
            observation_space, tokenizer.get("mission_key", "mission")
        )
        config = make_thalamus_config(thalamus, max(keys.feedback_dim, 1))
        core = ThalamusCore(config)
        super().__init__(observation_space, features_dim=core.features_dim)
        self.config = config
        self.tokenizer = Tokenizer(
            observation_space, d_model=config.d_model, d_task=config.d_task, **tokenizer
        )
        n_tokens = self.tokenizer.n_tokens
        if config.gate_enabled and config.top_k > n_tokens:
            # More slots than tokens only pads every step with copies (1000 slots on ~60
            # tokens: one update ran 13 min in ~15 GB), so refuse before any work.
            layout = self.tokenizer.token_layout
            raise ValueError(
                f"thalamus.top_k = {config.top_k} is more than the {n_tokens} tokens this "
                f"observation space gives per step ({layout.image.stop - layout.image.start} "
                f"cells, 1 proprioceptive, {layout.mission.stop - layout.mission.start} mission "
                f"words): set thalamus.top_k to at most {n_tokens}"
            )
        self.core = core
        self.compile_core = bool(compile_core)

    def _core_call(self, kind: str, compiled: bool) -> Callable[..., Any]:
        """``core.step`` (``kind="step"``) or ``core.forward``, compiled when asked and enabled.

        The compiled functions live outside the module (:data:`_COMPILED`), so copying,
        pickling or saving the policy never meets them. ``dynamic=False``: each input shape
        (rollout batch, minibatch, a shorter last minibatch, evaluation batch) compiles once;
        the values of ``episode_starts`` never recompile (tests/test_policy.py).
        """
        if not (compiled and self.compile_core):
            return self.core.step if kind == "step" else self.core.forward
        fns = _COMPILED.setdefault(self.core, {})
        if kind not in fns:
            # The unbound function: a bound method would keep the core alive from the value.
            fns[kind] = th.compile(getattr(type(self.core), kind), dynamic=False)
        return functools.partial(fns[kind], self.core)

    def forward(self, observations: PyTorchObs) -> th.Tensor:
        raise TypeError(
            "ThalamusExtractor is recurrent: call step(obs, state, episode_starts) or "
            "sequence(obs, state, episode_starts) (ThalamusPolicy does)."
        )

    def step(
        self,
        obs: Mapping[str, th.Tensor],
        state: ThalamusState | None,
        episode_starts: th.Tensor | None,
        with_stats: bool = True,
        compiled: bool = False,
    ) -> tuple[ThalamusOutput, ThalamusState]:
        """One step: ``obs`` entries ``[B, ...]``, ``episode_starts`` ``[B]`` bool.

        ``compiled``: use the compiled core if ``compile_core`` is on."""
        run = self._core_call("step", compiled)
        return self._tokenize_and_run(run, obs, state, episode_starts, with_stats)

    def sequence(
        self,
        obs: Mapping[str, th.Tensor],
        state: ThalamusState | None,
        episode_starts: th.Tensor | None,
        with_stats: bool = True,
        compiled: bool = False,
    ) -> tuple[ThalamusOutput, ThalamusState]:
        """Whole sequences: ``obs`` entries ``[B, T, ...]``, ``episode_starts`` ``[B, T]`` bool.

        ``compiled``: use the compiled core if ``compile_core`` is on."""
        run = self._core_call("forward", compiled)
        return self._tokenize_and_run(run, obs, state, episode_starts, with_stats)

    def _tokenize_and_run(self, run, obs, state, episode_starts, with_stats):
        """Tokenize ``obs`` and feed the tokens to ``run`` (``core.step`` or ``core``)."""
        t: TokenizedObs = self.tokenizer(obs)
        out, state = run(
            t.tokens,
            t.token_mask,
            t.task,
            t.feedback,
            positions=t.positions,
            state=state,
            episode_starts=episode_starts,
            with_stats=with_stats,
        )
        if with_stats:  # what the kept slots hold: the core does not know the token kinds
            out.stats.update(
                slot_kind_stats(
                    out.indices,
                    t.token_mask,
                    self.tokenizer.token_layout,
                    self.config.gate_enabled,
                )
            )
        return out, state


#: The ``torch.compile`` functions of each core (:meth:`ThalamusExtractor._core_call`), kept
#: beside the module rather than on it; an entry goes when its core does.
_COMPILED: weakref.WeakKeyDictionary[ThalamusCore, dict[str, Callable[..., Any]]] = (
    weakref.WeakKeyDictionary()
)

#: Adam's (and AdamW's) ``eps`` unless ``optimizer_kwargs`` gives one: SB3's choice for its
#: actor-critic policies, so ThalamusPPO and the baselines share it. Adam's step is
#: ``lr * m / (sqrt(v) + eps)``: with PyTorch's 1e-8 a parameter moves by about the full rate
#: whatever its gradient's size, with 1e-5 one whose gradients stay under ~1e-5 moves less,
#: and many of the core's gradients are that small (``docs/measurements.md``, "Adam eps").
ADAM_EPS = 1e-5

#: Mixed into the seed of the separate critic core's random stream (any constant would do: it
#: only has to differ from the streams the actor's modules are drawn from).
_CRITIC_STREAM = 0x5EED_C217


class ThalamusPolicy(ActorCriticPolicy):
    """Actor-critic policy whose shared feature extractor is the thalamus (recurrent).

    :param observation_space: a ``gymnasium.spaces.Dict`` observation space.
    :param action_space: the action space.
    :param lr_schedule: learning-rate schedule.
    :param thalamus: ``ThalamusConfig`` fields as a dict (``d_model``, ``d_task``, ``top_k``,
        ``use_feedback``, ``gate_enabled``, ``streams``, ``n_iterations``, ...);
        ``n_feedback_signals`` is set from the observation space.
    :param tokenizer: extra :class:`agents.tokenizer.Tokenizer` arguments (``mission_key``,
        ``max_word_tokens``).
    :param net_arch: hidden layers of the actor and critic heads on top of the core's
        features, SB3 style (``dict(pi=[64], vf=[64])`` by default; ``[]`` for linear heads).
    :param activation_fn: activation of the heads.
    :param ortho_init: orthogonal initialisation of the heads (SB3's gains); the tokenizer and
        core keep their own initialisation.
    :param use_sde: gSDE exploration (continuous actions only), as in SB3.
    :param log_std_init: initial log standard deviation (continuous actions).
    :param full_std: gSDE option, as in SB3.
    :param use_expln: gSDE option, as in SB3.
    :param squash_output: gSDE option, as in SB3.
    :param normalize_images: unused (images are embedded as categories); kept for SB3's API.
    :param optimizer_class: optimizer class.
    :param optimizer_kwargs: optimizer arguments besides the learning rate. Adam and AdamW
        default to ``eps=ADAM_EPS`` (1e-5, as SB3's policies and so the baselines) and to
        ``fused=True`` (unless ``fused`` or ``foreach`` is given): the policy has
        ~90 parameter tensors, and the per-tensor loop PyTorch runs on CPU costs several
        times the fused step (``docs/measurements.md``, "fused Adam").
    :param compile_core: run the core's step (:meth:`act`: rollouts, and the episode loop of
        evaluation and videos, whose batch compiles once more) and sequence pass (updates,
        :meth:`evaluate_actions`) through ``torch.compile`` (inductor); the eager core stays
        the reference and serves :meth:`predict`, :meth:`predict_values` and the truncation
        bootstrap (any sub-batch of envs). Pays only for long runs:
        ``docs/benchmarks/profile.md``.
    :param core_lr_scale: the tokenizer and core train at ``core_lr_scale`` times the learning
        rate (the heads at the full rate). Adam moves every parameter by about the learning
        rate per step whatever its gradient, and the core's ~190k parameters sit behind
        several normalisations: at PPO's usual 1e-3 one epoch moves the policy far more
        through the core than through the heads (``docs/measurements.md``, "core_lr_scale"),
        enough to fit the advantage noise of reward-free rollouts and stop exploring.
    :param intrinsic_value_head: add a second linear value head, ``intrinsic_value_net``, on
        the critic's latent (beside ``value_net``), for the intrinsic return of
        ``exploration.mixing = value_head`` (:mod:`agents.intrinsic`); off, the policy is
        exactly the one without it. :class:`agents.ThalamusPPO` sets it.
    :param critic_trunk: what the critic's heads (``value_net`` and the intrinsic head) read.
        ``"shared"``: the actor's core, trained by the value loss too. ``"separate"``: a
        tokenizer and core of their own, ``critic_extractor`` (same settings, both at
        ``core_lr_scale``), so the value loss never reaches the actor's core; the state is
        then an :class:`ActorCriticState`, and the core's cost doubles. ``"detached"``: the
        actor core's features with the gradient stopped. The actor's parameters, and so its
        outputs, are the same in all three at the same seed: the critic's core is initialised
        on a random stream of its own.
    :param past_view_lags: with lags, add ``past_view_head``, a :class:`agents.past_view.
        PastViewHead` that predicts from the actor core's features the image seen that many
        steps back (``thalamus_ppo.aux_past_view_coef``; :class:`agents.ThalamusPPO` sets it);
        empty (the default), the policy is exactly the one without it. The head is initialised
        on a forked random stream, so every other parameter and every sampled action stay
        those of the policy without it, and trains at the heads' rate.
    """

    features_extractor: ThalamusExtractor
    critic_extractor: ThalamusExtractor | None
    intrinsic_value_net: nn.Linear | None
    past_view_head: PastViewHead | None

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        thalamus: Mapping[str, Any] | None = None,
        tokenizer: Mapping[str, Any] | None = None,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.Tanh,
        ortho_init: bool = True,
        use_sde: bool = False,
        log_std_init: float = 0.0,
        full_std: bool = True,
        use_expln: bool = False,
        squash_output: bool = False,
        normalize_images: bool = False,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        core_lr_scale: float = DEFAULT_CORE_LR_SCALE,
        compile_core: bool = False,
        intrinsic_value_head: bool = False,
        critic_trunk: str = "shared",
        past_view_lags: Sequence[int] = (),
    ) -> None:
        self.past_view_lags = tuple(past_view_lags)
        if critic_trunk not in CRITIC_TRUNKS:
            raise ValueError(
                f"critic_trunk must be one of {', '.join(CRITIC_TRUNKS)}, got {critic_trunk!r} "
                "(policy.critic_trunk in a run's config)."
            )
        self.critic_trunk = critic_trunk
        self.compile_core = bool(compile_core)
        self.intrinsic_value_head = bool(intrinsic_value_head)
        if not core_lr_scale > 0:
            raise ValueError(f"core_lr_scale must be > 0, got {core_lr_scale}.")
        self.core_lr_scale = float(core_lr_scale)
        if not isinstance(observation_space, spaces.Dict):
            raise TypeError(
                f"ThalamusPolicy needs a gymnasium.spaces.Dict observation space, got "
                f"{observation_space}. Build the env with envs.make_env / envs.make_vec_env."
            )
        self.thalamus_kwargs = dict(thalamus or {})
        self.tokenizer_kwargs = dict(tokenizer or {})
        optimizer_kwargs = dict(optimizer_kwargs or {})
        if optimizer_class in (th.optim.Adam, th.optim.AdamW):
            # SB3's ActorCriticPolicy sets Adam's eps to 1e-5 only when optimizer_kwargs is
            # None, and we always pass a dict: without this line the policy would train with
            # PyTorch's 1e-8, unlike the PPO and LSTM-PPO baselines.
            optimizer_kwargs.setdefault("eps", ADAM_EPS)
            if not {"fused", "foreach"} & optimizer_kwargs.keys():
                optimizer_kwargs["fused"] = True
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=dict(pi=[64], vf=[64]) if net_arch is None else net_arch,
            activation_fn=activation_fn,
            ortho_init=ortho_init,
            use_sde=use_sde,
            log_std_init=log_std_init,
            full_std=full_std,
            use_expln=use_expln,
            squash_output=squash_output,
            features_extractor_class=ThalamusExtractor,
            features_extractor_kwargs=dict(
                thalamus=self.thalamus_kwargs,
                tokenizer=self.tokenizer_kwargs,
                compile_core=self.compile_core,
            ),
            share_features_extractor=True,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
        )

    # ------------------------------------------------------------------ construction
    def _build(self, lr_schedule: Schedule) -> None:
        """Heads and optimizer; orthogonal init touches the heads only, never the core."""
        ortho_init = self.ortho_init
        self.ortho_init = False
        try:
            super()._build(lr_schedule)
        finally:
            self.ortho_init = ortho_init
        if ortho_init:
            for module, gain in (
                (self.mlp_extractor, np.sqrt(2)),
                (self.action_net, 0.01),
                (self.value_net, 1.0),
            ):
                module.apply(lambda m, g=gain: self.init_weights(m, gain=g))
        # On a forked random stream: every other parameter, and every action sampled later,
        # draws what the policy without the head would draw.
        self.intrinsic_value_net = None
        if self.intrinsic_value_head:
            with th.random.fork_rng(devices=[]):
                self.intrinsic_value_net = nn.Linear(self.mlp_extractor.latent_dim_vf, 1)
                if ortho_init:
                    self.init_weights(self.intrinsic_value_net, gain=1.0)
        self.critic_extractor = None
        if self.critic_trunk == "separate":
            # On a stream of its own, seeded from the forked one: the actor, the heads and
            # every action sampled later draw what they draw with a shared trunk, and the
            # critic's core does not copy the draws of the intrinsic head's (forked) init.
            with th.random.fork_rng(devices=[]):
                th.manual_seed(int(th.randint(2**62, ())) ^ _CRITIC_STREAM)
                self.critic_extractor = self.make_features_extractor()
            # SB3's vf_features_extractor is the actor's module here (we build SB3's policy
            # with a shared extractor): drop the name, so nothing reads the wrong trunk and a
            # state dict has only the two trunks' own keys.
            del self.vf_features_extractor
        self.past_view_head = None
        if self.past_view_lags:
            image_key = self.tokenizer.image_key
            if image_key is None:
                raise ValueError(
                    "past_view_lags (thalamus_ppo.aux_past_view_coef > 0) predicts past images, "
                    "but this observation space has no integer [H, W, C] image; set "
                    "thalamus_ppo.aux_past_view_coef = 0."
                )
            image_space = self.observation_space[image_key]  # type: ignore[index]
            with th.random.fork_rng(devices=[]):
                self.past_view_head = PastViewHead(
                    self.features_dim, image_space, self.past_view_lags
                )
        # Two parameter groups: the cores at core_lr_scale x the rate (see the class doc).
        # "lr_scale" is read by ThalamusPPO when it applies the learning-rate schedule.
        core = list(self.features_extractor.parameters())
        if self.critic_extractor is not None:
            core += list(self.critic_extractor.parameters())
        in_core = {id(p) for p in core}
        heads = [p for p in self.parameters() if id(p) not in in_core]
        lr = lr_schedule(1)
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            [
                {"params": core, "lr": lr * self.core_lr_scale, "lr_scale": self.core_lr_scale},
                {"params": heads, "lr": lr, "lr_scale": 1.0},
            ],
            lr=lr,
            **self.optimizer_kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.pop("features_extractor_class", None)
        data.pop("features_extractor_kwargs", None)
        data.update(
            thalamus=self.thalamus_kwargs,
            tokenizer=self.tokenizer_kwargs,
            core_lr_scale=self.core_lr_scale,
            compile_core=self.compile_core,
            intrinsic_value_head=self.intrinsic_value_head,
            critic_trunk=self.critic_trunk,
            past_view_lags=self.past_view_lags,
        )
        return data

    # ------------------------------------------------------------------ state helpers
    @property
    def tokenizer(self) -> Tokenizer:
        """The observation tokenizer (``tokenizer.token_layout`` maps token ids to cells)."""
        return self.features_extractor.tokenizer

    @property
    def core(self) -> ThalamusCore:
        """The thalamus core."""
        return self.features_extractor.core

    def initial_state(self, batch_size: int) -> PolicyState:
        """The all-zero state of ``batch_size`` envs on the policy's device (an
        :class:`ActorCriticState` with ``critic_trunk="separate"``)."""
        actor = self.core.initial_state(batch_size, device=self.device)
        if self.critic_extractor is None:
            return actor
        return ActorCriticState(
            actor, self.critic_extractor.core.initial_state(batch_size, device=self.device)
        )

    def _split_state(
        self, state: PolicyState | None
    ) -> tuple[ThalamusState | None, ThalamusState | None]:
        """``(actor state, critic state)`` of ``state`` (the critic's is ``None`` without a
        separate critic trunk; ``None`` in, zeros: ``(None, None)``)."""
        separate = self.critic_extractor is not None
        if isinstance(state, ActorCriticState) and not separate:
            raise TypeError(
                f"got an ActorCriticState, but this policy's critic_trunk is "
                f"{self.critic_trunk!r}: its state is one ThalamusState (pass the state this "
                "policy returned, or None for zeros)."
            )
        if state is None:
            return None, None
        if not separate:
            return state, None
        if not isinstance(state, ActorCriticState):
            raise TypeError(
                "this policy has critic_trunk='separate': its state is an ActorCriticState "
                f"(actor and critic), got {type(state).__name__}; pass the state this policy "
                "returned, or None for zeros."
            )
        return state.actor, state.critic

    @staticmethod
    def _join_state(actor: ThalamusState, critic: ThalamusState | None) -> PolicyState:
        return actor if critic is None else ActorCriticState(actor, critic)

    # ------------------------------------------------------------------ heads
    def _action_distribution(self, features: th.Tensor) -> Distribution:
        """The action distribution of the actor core's flat features ``[M, features_dim]``."""
        return self._get_action_dist_from_latent(self.mlp_extractor.forward_actor(features))

    def _critic_latent(self, features: th.Tensor, critic_features: th.Tensor | None) -> th.Tensor:
        """The critic's latent ``[M, latent_dim_vf]``: of ``critic_features`` (the critic
        core's, with a separate trunk) or of the actor core's ``features``."""
        if self.critic_extractor is not None:
            assert critic_features is not None, "a separate critic trunk needs its features"
            return self.mlp_extractor.forward_critic(critic_features)
        if self.critic_trunk == "detached":
            features = features.detach()
        return self.mlp_extractor.forward_critic(features)

    def _all_heads(
        self, features: th.Tensor, critic_features: th.Tensor | None = None
    ) -> tuple[Distribution, th.Tensor, th.Tensor | None]:
        """Action distribution, values ``[M]`` and intrinsic values ``[M]`` (``None`` without
        the intrinsic head) from the actor core's flat features ``[M, features_dim]`` and,
        with a separate critic trunk, the critic core's ``critic_features`` (same shape)."""
        distribution = self._action_distribution(features)
        latent_vf = self._critic_latent(features, critic_features)
        return distribution, self.value_net(latent_vf).squeeze(-1), self._intrinsic(latent_vf)

    def _intrinsic(self, latent_vf: th.Tensor) -> th.Tensor | None:
        """The intrinsic head's values ``[M]`` of critic latents ``[M, latent_dim_vf]``."""
        if self.intrinsic_value_net is None:
            return None
        return self.intrinsic_value_net(latent_vf).squeeze(-1)

    def past_view_loss(
        self,
        features: th.Tensor,
        observations: Mapping[str, th.Tensor],
        episode_starts: th.Tensor,
    ) -> PastViewLoss:
        """The past-view loss (:mod:`agents.past_view`) of a minibatch of whole sequences.

        :param features: ``[B, T, F]`` the actor core's features
            (``SequenceEvaluation.thalamus.features``).
        :param observations: one tensor per key, ``[B, T, *space.shape]``.
        :param episode_starts: ``[B, T]`` bool.
        :raises RuntimeError: the policy was built without ``past_view_lags``.
        """
        if self.past_view_head is None:
            raise RuntimeError(
                "this policy has no past-view head: build it with past_view_lags "
                "(ThalamusPPO does when aux_past_view_coef > 0)."
            )
        image_key = self.tokenizer.image_key
        assert image_key is not None
        return self.past_view_head(features, observations[image_key], episode_starts)

    # ------------------------------------------------------------------ recurrent API
    def act(
        self,
        obs: Mapping[str, th.Tensor],
        state: PolicyState | None,
        episode_starts: th.Tensor | None,
        deterministic: bool = False,
        with_stats: bool = True,
    ) -> PolicyStep:
        """One step for ``B`` envs; the function used by rollouts, evaluation and videos.

        :param obs: one tensor per key, ``[B, *space.shape]``.
        :param state: the state after the previous step (``None``: zeros).
        :param episode_starts: ``[B]`` bool, True where ``obs`` starts a new episode.
        :param deterministic: take the distribution's mode instead of sampling.
        :param with_stats: fill ``PolicyStep.thalamus.stats`` (False: empty, faster).
        :return: a :class:`PolicyStep`.
        """
        actor_state, critic_state = self._split_state(state)
        out, actor_state = self.features_extractor.step(
            obs, actor_state, episode_starts, with_stats, compiled=True
        )
        critic_features = None
        if self.critic_extractor is not None:
            critic_out, critic_state = self.critic_extractor.step(
                obs, critic_state, episode_starts, with_stats=False, compiled=True
            )
            critic_features = critic_out.features
        distribution, values, intrinsic_values = self._all_heads(out.features, critic_features)
        actions = distribution.get_actions(deterministic=deterministic)
        log_probs = distribution.log_prob(actions)
        actions = actions.reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        state = self._join_state(actor_state, critic_state)
        return PolicyStep(actions, values, log_probs, state, out, intrinsic_values)

    def forward(  # type: ignore[override]
        self,
        obs: Mapping[str, th.Tensor],
        state: PolicyState | None = None,
        episode_starts: th.Tensor | None = None,
        deterministic: bool = False,
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, PolicyState]:
        """sb3-contrib's recurrent ``forward``: ``(actions, values [B], log_probs [B], state)``."""
        step = self.act(obs, state, episode_starts, deterministic, with_stats=False)
        return step.actions, step.values, step.log_probs, step.state

    def predict_values(  # type: ignore[override]
        self,
        obs: Mapping[str, th.Tensor],
        state: PolicyState | None = None,
        episode_starts: th.Tensor | None = None,
    ) -> th.Tensor:
        """Values ``[B]`` of one step of ``B`` envs from ``state`` (``None``: zeros)."""
        return self.predict_all_values(obs, state, episode_starts)[0]

    def predict_all_values(
        self,
        obs: Mapping[str, th.Tensor],
        state: PolicyState | None = None,
        episode_starts: th.Tensor | None = None,
    ) -> tuple[th.Tensor, th.Tensor | None]:
        """Values and intrinsic values (``None`` without the intrinsic head), each ``[B]``, of
        one step of ``B`` envs from ``state`` (``None``: zeros); with a separate critic trunk
        only the critic's core runs."""
        actor_state, critic_state = self._split_state(state)
        if self.critic_extractor is not None:
            out, _ = self.critic_extractor.step(obs, critic_state, episode_starts, with_stats=False)
            latent_vf = self._critic_latent(out.features, out.features)
        else:
            out, _ = self.features_extractor.step(
                obs, actor_state, episode_starts, with_stats=False
            )
            latent_vf = self._critic_latent(out.features, None)
        return self.value_net(latent_vf).squeeze(-1), self._intrinsic(latent_vf)

    def get_distribution(  # type: ignore[override]
        self,
        obs: Mapping[str, th.Tensor],
        state: PolicyState | None = None,
        episode_starts: th.Tensor | None = None,
    ) -> tuple[Distribution, PolicyState]:
        """The action distribution of one step of ``B`` envs, and the next state (with a
        separate critic trunk the critic's core steps too, so the state stays whole)."""
        actor_state, critic_state = self._split_state(state)
        out, actor_state = self.features_extractor.step(
            obs, actor_state, episode_starts, with_stats=False
        )
        if self.critic_extractor is not None:
            _, critic_state = self.critic_extractor.step(
                obs, critic_state, episode_starts, with_stats=False
            )
        return self._action_distribution(out.features), self._join_state(actor_state, critic_state)

    def evaluate_actions(  # type: ignore[override]
        self,
        obs: Mapping[str, th.Tensor],
        actions: th.Tensor,
        state: PolicyState | None,
        episode_starts: th.Tensor,
    ) -> SequenceEvaluation:
        """Re-run whole sequences and evaluate the actions taken (PPO's update).

        :param obs: one tensor per key, ``[B, T, *space.shape]``.
        :param actions: ``[B, T]`` (discrete) or ``[B, T, action_dim]`` actions.
        :param state: the state of the ``B`` envs before step 0 (``None``: zeros).
        :param episode_starts: ``[B, T]`` bool; the core(s) reset inside the scan.
        :return: a :class:`SequenceEvaluation` with ``[B, T]`` values, log-probs, entropies
            (and intrinsic values, with the intrinsic head).
        """
        actor_state, critic_state = self._split_state(state)
        out, _ = self.features_extractor.sequence(
            obs, actor_state, episode_starts, with_stats=False, compiled=True
        )
        batch, steps = episode_starts.shape
        critic_features = None
        if self.critic_extractor is not None:
            critic_out, _ = self.critic_extractor.sequence(
                obs, critic_state, episode_starts, with_stats=False, compiled=True
            )
            critic_features = critic_out.features.reshape(batch * steps, -1)
        distribution, values, intrinsic = self._all_heads(
            out.features.reshape(batch * steps, -1), critic_features
        )
        log_prob = distribution.log_prob(actions.reshape(batch * steps, *actions.shape[2:]))
        entropy = distribution.entropy()
        return SequenceEvaluation(
            values=values.view(batch, steps),
            log_prob=log_prob.view(batch, steps),
            entropy=None if entropy is None else entropy.view(batch, steps),
            thalamus=out,
            intrinsic_values=None if intrinsic is None else intrinsic.view(batch, steps),
        )

    def _predict(  # type: ignore[override]
        self,
        observation: Mapping[str, th.Tensor],
        state: PolicyState | None = None,
        episode_starts: th.Tensor | None = None,
        deterministic: bool = False,
    ) -> tuple[th.Tensor, PolicyState]:
        distribution, state = self.get_distribution(observation, state, episode_starts)
        return distribution.get_actions(deterministic=deterministic), state

    def predict(  # type: ignore[override]
        self,
        observation: np.ndarray | dict[str, np.ndarray],
        state: PolicyState | None = None,
        episode_start: np.ndarray | None = None,
        deterministic: bool = False,
    ) -> tuple[np.ndarray, PolicyState]:
        """sb3-contrib's recurrent ``predict``.

        :param observation: one observation or a batch of ``n_envs`` (a VecEnv's).
        :param state: what the previous call returned (``None``: zeros).
        :param episode_start: ``[n_envs]`` True where the observation starts an episode (the
            state is reset before it); ``None``: no resets.
        :param deterministic: take the distribution's mode.
        :return: ``(actions, state)``; pass ``state`` back in with the next observation.
        """
        self.set_training_mode(False)
        if (
            isinstance(observation, tuple)
            and len(observation) == 2
            and isinstance(observation[1], dict)
        ):
            raise ValueError(
                "predict() got a tuple (obs, info): you are mixing the Gymnasium API "
                "(`obs, info = env.reset()`) with SB3's VecEnv API (`obs = vec_env.reset()`)."
            )
        obs_tensor, vectorized_env = self.obs_to_tensor(observation)
        n_envs = next(iter(obs_tensor.values())).shape[0]  # type: ignore[union-attr]
        starts = None
        if episode_start is not None:
            starts = th.as_tensor(np.asarray(episode_start), device=self.device).reshape(n_envs)
            starts = starts.bool()
        if state is not None and state.batch_size != n_envs:
            raise ValueError(
                f"predict() got a state of {state.batch_size} envs for a batch of "
                f"{n_envs} observations; pass state=None to start from zeros."
            )
        with th.no_grad():
            actions, state = self._predict(obs_tensor, state, starts, deterministic)  # type: ignore[arg-type]
        actions = actions.cpu().numpy().reshape((-1, *self.action_space.shape))  # type: ignore[misc]
        if isinstance(self.action_space, spaces.Box):
            if self.squash_output:
                actions = self.unscale_action(actions)
            else:
                actions = np.clip(actions, self.action_space.low, self.action_space.high)
        if not vectorized_env:
            actions = actions.squeeze(axis=0)
        return actions, state
