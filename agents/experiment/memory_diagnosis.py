"""Why does an agent fail MiniGrid-Memory? Does it look at the cue, and does its state hold it?

MiniGrid-MemoryS<N> starts the agent in or east of the start room, facing east, away from
the cue object (a key or a ball in the room's north-west corner). To succeed it must turn
back and look at the cue, walk the hallway and go to the matching object at the split.
A success rate near 0.5 can mean two different failures: the agent never looks at the cue
(an exploration failure, memory never gets tested), or it looks but its state does not hold
the cue at the split (a memory failure). :func:`diagnose` tells them apart.

It plays episodes with the trained policy on the eval seeds and records, per episode,
whether the cue cell entered the agent's view (MiniGrid's own occluded view, ``agent_sees``)
before the end, the outcome and the policy's features at the last step (ThalamusPPO: the
core's output features; LSTM-PPO: the actor LSTM's hidden state; PPO: the actor's latent of
the current observation). A linear probe (L2 logistic regression) is then fit on half of the
episodes that saw the cue and made a choice, and scored on the other half: its held-out
accuracy at decoding the cue type at the decision, against the majority-class rate.

How long the cue survives, and where (``by_lag``): the diagnosis also records the policy's
features at *every* step and, for ThalamusPPO, every stream's readout and outputs
(:class:`StreamRecorder`, a read-only hook on the core). For the episodes that saw the cue,
each step from the first sighting on gets its lag, the steps since the cue was last in view
(:func:`steps_since_seen`), and a probe is fit per lag bin (:data:`LAG_BINS`) on half of
the episodes and scored on the other half (:func:`probe_by_lag`): the probe's accuracy by lag
says whether the memory decays, and per stream, which stream holds the cue at which lag.
Beside it stand each stream's parametric half-lives (:func:`half_life_summary`): the decay
the trained parameters allow against what the probe reads. A stream's readout holds nothing
of the past (but the gate's reward feedback): it is the control, what the current view
shows of the cue (at long lags, through where the policy has walked and looks).

``scripts/diagnose_memory.py`` is the command line; the benchmark runner records
:func:`summarize` of it for every run on a Memory env (``memory_diagnosis`` in the record).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agents.experiment.config import ConfigError, ExperimentConfig

MIN_PROBE_EPISODES = 20
"""Fewer eligible episodes than this and the probe is not fit (its accuracy would be noise)."""
PROBE_L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)
LagBins = tuple[tuple[int, int | None], ...]
LAG_BINS: LagBins = ((0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, None))
"""Bins of steps since the cue was last in view, inclusive (``None``: no upper bound)."""
MIN_LAG_PROBE_EPISODES = 10
"""A lag bin's probe is fit only with at least this many training and test episodes in it."""
MAX_LAG_PROBE_ROWS = 4000
"""A lag bin's probe trains on at most this many steps (a random subset), to bound its cost
(an episode that wanders to the step limit gives hundreds of steps at long lags)."""


@dataclass
class MemoryEpisode:
    """One episode of a Memory env.

    :param cue: ``"key"`` or ``"ball"``, the object in the start room.
    :param cue_seen: the cue cell was in the agent's occluded view at some step.
    :param first_seen_step: the step index at which it was first seen (``None``: never).
    :param outcome: ``"success"``, ``"failure"`` (the other object) or ``"timeout"``.
    :param length: steps taken.
    :param start_x: the agent's start column (the start room is columns 1-3).
    """

    cue: str
    cue_seen: bool
    first_seen_step: int | None
    outcome: str
    length: int
    start_x: int


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy of an L2 logistic-regression probe of ``labels`` from ``features``.

    The episodes are split in half at random (``seed``); the L2 weight is chosen on a 3:1
    split of the training half, the probe refit on the whole half and scored on the other.

    :param features: ``[N, F]`` float features.
    :param labels: ``[N]`` bool labels.
    :return: ``accuracy``, ``majority`` (the test half's majority-class rate), ``n_train``,
        ``n_test`` and the chosen ``l2``.
    """
    import torch as th

    perm = th.randperm(len(features), generator=th.Generator().manual_seed(seed))
    train, test = perm[: len(features) // 2], perm[len(features) // 2 :]
    inner = len(train) * 3 // 4
    return _fit_and_score(features, labels, train, train[:inner], train[inner:], test)


def _fit_and_score(
    features: np.ndarray,
    labels: np.ndarray,
    train: Any,
    inner_fit: Any,
    inner_val: Any,
    test: Any,
    weights: np.ndarray | None = None,
) -> dict[str, Any]:
    """Fit the probe on rows ``train`` and score it on rows ``test`` (1-D long tensors).

    The features are standardised with the ``train`` rows' mean and std; the L2 weight is the
    one of :data:`PROBE_L2_GRID` whose fit on ``inner_fit`` scores best on ``inner_val``
    (ties, and an empty ``inner_val``, go to the strongest).

    :param weights: ``[N]`` positive row weights in the loss, the accuracy and the majority
        rate (None: all rows alike).
    """
    import torch as th

    x = th.as_tensor(features, dtype=th.float64)
    y = th.as_tensor(labels, dtype=th.float64)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    row_weight = None if weights is None else th.as_tensor(weights, dtype=th.float64)

    def weight_of(ids: th.Tensor) -> th.Tensor | None:
        """The rows' weights, scaled to mean 1 (None: unweighted)."""
        return None if row_weight is None else row_weight[ids] / row_weight[ids].mean()

    def fit(ids: th.Tensor, l2: float) -> tuple[th.Tensor, th.Tensor]:
        w = th.zeros(x.shape[1], dtype=th.float64, requires_grad=True)
        b = th.zeros(1, dtype=th.float64, requires_grad=True)
        opt = th.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
        rows = weight_of(ids)

        def closure() -> th.Tensor:
            opt.zero_grad()
            logits = x[ids] @ w + b
            loss = th.nn.functional.binary_cross_entropy_with_logits(logits, y[ids], rows)
            loss = loss + l2 * w.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        return w.detach(), b.detach()

    def mean_of(ids: th.Tensor, values: th.Tensor) -> float:
        rows = weight_of(ids)
        return float(values.mean() if rows is None else (rows * values).mean())

    def accuracy(ids: th.Tensor, w: th.Tensor, b: th.Tensor) -> float:
        return mean_of(ids, ((x[ids] @ w + b > 0).double() == y[ids]).double())

    if len(inner_val) and len(inner_fit):
        scores = [(accuracy(inner_val, *fit(inner_fit, l2)), l2) for l2 in PROBE_L2_GRID]
        l2 = max(scores)[1]  # best inner accuracy; ties go to the stronger L2 (the larger)
    else:
        l2 = max(PROBE_L2_GRID)
    w, b = fit(train, l2)
    share = mean_of(test, y[test])
    return {
        "accuracy": accuracy(test, w, b),
        "majority": max(share, 1.0 - share),
        "n_train": len(train),
        "n_test": len(test),
        "l2": l2,
    }


def lag_bin_label(low: int, high: int | None) -> str:
    """``"0"``, ``"1-2"``, ``">20"``: the name of the bin ``[low, high]`` (None: no bound)."""
    if high is None:
        return f">{low - 1}"
    return str(low) if low == high else f"{low}-{high}"


def steps_since_seen(in_view: np.ndarray) -> np.ndarray:
    """Steps since the cue was last in view, at every step of an episode.

    :param in_view: ``[T]`` bool, the cue cell was in the agent's view at step ``t``.
    :return: ``[T]`` int: 0 where it is in view, ``t - t_last`` after, -1 before it was
        first seen.

    >>> steps_since_seen(np.array([False, True, False, False, True, False])).tolist()
    [-1, 0, 1, 2, 0, 1]
    """
    steps = np.arange(len(in_view))
    last = np.maximum.accumulate(np.where(in_view, steps, -1))
    return np.where(last >= 0, steps - last, -1)


def lag_bins(lags: np.ndarray, bins: LagBins = LAG_BINS) -> np.ndarray:
    """The index in ``bins`` of each lag; -1 where none holds it.

    :param lags: ``[N]`` int, steps since the cue was last in view (-1: not seen yet).
    :return: ``[N]`` int.
    """
    index = np.full(len(lags), -1)
    for i, (low, high) in enumerate(bins):
        inside = (lags >= low) if high is None else (lags >= low) & (lags <= high)
        index[inside] = i
    return index


def split_episodes(
    ids: np.ndarray, cues: np.ndarray, generator: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split episodes in half at random, within each cue (so both halves hold the cues in the
    same proportion, up to one episode), and the training half 3:1 the same way.

    :param ids: ``[E]`` episode ids. :param cues: ``[E]`` bool, each episode's cue.
    :param generator: a ``torch.Generator`` (the draws are its).
    :return: the training ids, the test ids, and the training ids that fit the probe while
        the L2 weight is chosen (the rest of the training ids score it).
    """
    import torch as th

    train, test, inner = [], [], []
    for n, cue in enumerate((False, True)):
        of_cue = ids[cues == cue]
        order = of_cue[th.randperm(len(of_cue), generator=generator).numpy()]
        half = (len(order) + n) // 2  # an odd class's extra episode: test, then train
        train.append(order[:half])
        test.append(order[half:])
        inner.append(order[: half * 3 // 4])
    return np.concatenate(train), np.concatenate(test), np.concatenate(inner)


def probe_by_lag(
    features: np.ndarray,
    labels: np.ndarray,
    lags: np.ndarray,
    episodes: np.ndarray,
    seed: int = 0,
    bins: LagBins = LAG_BINS,
) -> list[dict[str, Any]]:
    """Held-out accuracy of the cue probe at each lag since the cue was last in view.

    The rows are steps of many episodes. The episodes (not the steps: steps of one episode
    are alike) are split in half at random (``seed``), within each cue, and the training half
    3:1 for the L2 choice (:func:`split_episodes`), once for all bins, so that every bin and
    every caller with the same ``episodes``, ``labels`` and ``seed`` uses the same split.
    Each bin's probe is fit on its training steps (a random :data:`MAX_LAG_PROBE_ROWS` of them
    at most) and scored on its test steps: what the features hold of the cue that many steps
    after it was seen, whatever the code they hold it in at that lag. Within a bin each
    episode weighs 1, in the fit, the accuracy and the majority rate, however many of its
    steps fall in the bin (an agent that stands still in view of the cue for 100 steps would
    otherwise be most of the bin ``0``).

    :param features: ``[N, F]`` float, one row per step.
    :param labels: ``[N]`` bool, the step's episode's cue (the same for all its steps).
    :param lags: ``[N]`` int, steps since the cue was last in view (:func:`steps_since_seen`;
        rows with -1 fall in no bin).
    :param episodes: ``[N]`` int, the step's episode.
    :param bins: inclusive ``(low, high)`` lag bounds, None: no upper bound.
    :return: per bin: ``bin`` (its label), ``train_episodes`` and ``test_episodes`` (episodes
        with a step in it), ``n_train`` and ``n_test`` (steps) and, when both halves have at
        least :data:`MIN_LAG_PROBE_EPISODES` episodes in it and the training steps hold both
        cues, ``accuracy`` and ``majority`` (the test episodes' majority-class rate), both
        averaged over the test episodes, and ``l2`` (otherwise None).
    """
    import torch as th

    generator = th.Generator().manual_seed(seed)
    ids, first = np.unique(episodes, return_index=True)
    train_ids, test_ids, inner_ids = split_episodes(ids, labels[first], generator)
    is_train, is_test = np.isin(episodes, train_ids), np.isin(episodes, test_ids)
    is_inner = np.isin(episodes, inner_ids)
    which = lag_bins(lags, bins)
    results = []
    for i, (low, high) in enumerate(bins):
        train = np.flatnonzero((which == i) & is_train)
        test = np.flatnonzero((which == i) & is_test)
        if len(train) > MAX_LAG_PROBE_ROWS:
            keep = th.randperm(len(train), generator=generator)[:MAX_LAG_PROBE_ROWS].numpy()
            train = np.sort(train[keep])
        row: dict[str, Any] = {
            "bin": lag_bin_label(low, high),
            "train_episodes": len(np.unique(episodes[train])),
            "test_episodes": len(np.unique(episodes[test])),
            "n_train": len(train),
            "n_test": len(test),
            "accuracy": None,
            "majority": None,
            "l2": None,
        }
        enough = min(row["train_episodes"], row["test_episodes"]) >= MIN_LAG_PROBE_EPISODES
        if enough and len(np.unique(labels[train])) == 2:
            as_ids = lambda rows: th.as_tensor(rows, dtype=th.long)  # noqa: E731
            # Each episode weighs 1 in the bin, however many of its steps fall in it.
            weights = np.zeros(len(episodes))
            for rows in (train, test):
                _, where, count = np.unique(episodes[rows], return_inverse=True, return_counts=True)
                weights[rows] = 1.0 / count[where]
            scored = _fit_and_score(
                features,
                labels,
                as_ids(train),
                as_ids(train[is_inner[train]]),
                as_ids(train[~is_inner[train]]),
                as_ids(test),
                weights,
            )
            row.update(accuracy=scored["accuracy"], majority=scored["majority"], l2=scored["l2"])
        results.append(row)
    return results


@dataclass
class EpisodeTrace:
    """What the diagnosis records at every step ``t`` of one episode (``T`` steps).

    :ivar in_view: ``[T]`` bool, the cue cell was in the agent's view at step ``t``.
    :ivar features: ``[T, F]`` the policy's features at step ``t`` (those it acted on).
    :ivar streams: ThalamusPPO only (else empty): per name of :class:`StreamRecorder`,
        ``[T, d_model]`` that stream vector at step ``t``.
    :ivar stream_weights: ThalamusPPO only: ``[T, M]`` the competition weights α.
    :ivar decay_rates: with a :class:`StreamRecorder` (else empty): per name of its
        ``rate_names``, ``[T, nheads]`` the first layer's decay rates.
    """

    in_view: np.ndarray
    features: np.ndarray
    streams: dict[str, np.ndarray]
    stream_weights: np.ndarray | None
    decay_rates: dict[str, np.ndarray] = field(default_factory=dict)


class StreamRecorder:
    """Reads every thalamus stream's input and output at each step, through
    :meth:`thalamus_rl.DistributedMamba.register_stream_hook` (read-only: the policy acts the
    same with and without it).

    Per stream ``name`` and step it keeps (batch of one, ``[d_model]`` each):

    * ``"{name} readout"``: the stream's readout of the step's kept tokens (the input of
      feedback iteration 1), which holds nothing of past steps but what the gate's reward
      feedback brings: the control, what the current view alone shows;
    * ``"{name} out {i}"``: the stream's output in feedback iteration ``i`` (1 to
      ``n_iterations``); ``out 1`` is the stream on its readouts alone, ``out 2`` on, the
      stream also reads the previous step's workspace, which all streams write.

    and per Mamba stream and iteration ``"{name} {i}"`` in :attr:`rate_names`, ``[nheads]``
    the per-step decay rate ``dt_t * exp(A_log)`` of each head of the stream's first layer at
    that step (its state decays by ``exp(-rate)``; ``ln 2 / rate`` is the half-life the
    input allows at that step, where :meth:`~thalamus_rl.DistributedMamba.half_lives` gives
    it for a zero ``dt`` input). A clocked stream's rate counts at its ticks only.

    :param streams: the core's :class:`~thalamus_rl.DistributedMamba`.
    """

    def __init__(self, streams: Any) -> None:
        from thalamus_rl.distributed import MambaStream

        self.streams = streams
        self.stream_names: tuple[str, ...] = tuple(streams.stream_names)
        self.names = [
            f"{name} {part}"
            for name in self.stream_names
            for part in ("readout", *(f"out {i + 1}" for i in range(streams.n_iterations)))
        ]
        self._mamba = {
            m: stream for m, stream in enumerate(streams.streams) if isinstance(stream, MambaStream)
        }
        self.rate_names = [
            f"{self.stream_names[m]} {i + 1}"
            for m in self._mamba
            for i in range(streams.n_iterations)
        ]
        self._step: dict[str, np.ndarray] = {}
        self._handle: Any = None

    def _rates(self, inputs: Any) -> dict[int, np.ndarray]:
        """Per Mamba stream ``m``: ``[nheads]`` its first layer's decay rates on ``inputs``."""
        import torch as th
        import torch.nn.functional as F

        rates = {}
        with th.no_grad():
            for m, stream in self._mamba.items():
                block = stream.blocks[0]
                dt_raw = block.in_proj(stream.norms[0](inputs[:, m]))[..., -block.nheads :]
                rate = F.softplus(dt_raw + block.dt_bias) * th.exp(block.A_log)
                rates[m] = rate[0].double().cpu().numpy()
        return rates

    def _hook(self, iteration: int, inputs: Any, outputs: Any) -> None:
        if inputs.ndim != 3 or inputs.shape[0] != 1:
            raise RuntimeError(
                f"StreamRecorder reads single steps of one env, got inputs {tuple(inputs.shape)}"
            )
        if iteration == 0:
            self._step = {}
            for m, name in enumerate(self.stream_names):
                self._step[f"{name} readout"] = inputs[0, m].detach().double().cpu().numpy()
        for m, name in enumerate(self.stream_names):
            out = outputs[0, m].detach().double().cpu().numpy()
            self._step[f"{name} out {iteration + 1}"] = out
        for m, rate in self._rates(inputs).items():
            self._step[f"{self.stream_names[m]} {iteration + 1}"] = rate

    def take(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The last step's vectors (by :attr:`names`) and decay rates (by :attr:`rate_names`),
        once (an error if no complete step was recorded since the last call)."""
        step, self._step = self._step, {}
        if set(step) != {*self.names, *self.rate_names}:
            raise RuntimeError("StreamRecorder: no complete core step since the last take()")
        return {n: step[n] for n in self.names}, {n: step[n] for n in self.rate_names}

    def __enter__(self) -> StreamRecorder:
        self._handle = self.streams.register_stream_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()


def play(model: Any, env: Any, seed: int, deterministic: bool) -> tuple[MemoryEpisode, np.ndarray]:
    """Play one episode; return it and the policy's features ``[F]`` at its last step."""
    episode, trace = play_traced(model, env, seed, deterministic)
    return episode, trace.features[-1]


def play_traced(
    model: Any,
    env: Any,
    seed: int,
    deterministic: bool,
    recorder: StreamRecorder | None = None,
) -> tuple[MemoryEpisode, EpisodeTrace]:
    """Play one episode; return it and its :class:`EpisodeTrace`.

    :param recorder: an entered :class:`StreamRecorder` on the model's core, to record the
        streams (None: ``trace.streams`` stays empty).
    """
    from agents.experiment.rollout import play_episode

    grid = env.unwrapped
    layout: dict[str, Any] = {}  # read at the first step, from the episode's reset
    in_view: list[bool] = []
    features: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    streams: dict[str, list[np.ndarray]] = {}
    rates: dict[str, list[np.ndarray]] = {}

    def watch_cue(_episode: Any, _obs: Any, step: Any) -> None:
        if not layout:
            layout["cue_cell"] = (1, grid.height // 2 - 1)
            layout["cue"] = grid.grid.get(*layout["cue_cell"]).type
            layout["start_x"] = int(grid.agent_pos[0])
        in_view.append(bool(grid.agent_sees(*layout["cue_cell"])))
        assert step.features is not None
        features.append(np.asarray(step.features, dtype=np.float64).copy())
        if step.thalamus is not None:
            weights.append(step.thalamus.stream_weights[0].detach().double().cpu().numpy())
        if recorder is not None:
            vectors, decay = recorder.take()
            for name, value in vectors.items():
                streams.setdefault(name, []).append(value)
            for name, value in decay.items():
                rates.setdefault(name, []).append(value)

    episode = play_episode(
        model, env, deterministic=deterministic, seed=seed, with_features=True, on_step=watch_cue
    )
    if episode.episode_return > 0:
        outcome = "success"
    else:
        outcome = "failure" if episode.terminated else "timeout"
    seen = np.array(in_view)
    seen_at = int(np.argmax(seen)) if seen.any() else None
    row = MemoryEpisode(
        layout["cue"], seen_at is not None, seen_at, outcome, episode.length, layout["start_x"]
    )
    trace = EpisodeTrace(
        in_view=seen,
        features=np.stack(features),
        streams={name: np.stack(values) for name, values in streams.items()},
        stream_weights=np.stack(weights) if weights else None,
        decay_rates={name: np.stack(values) for name, values in rates.items()},
    )
    return row, trace


def half_life_summary(core: Any) -> dict[str, dict[str, Any]]:
    """Per stream of a :class:`~thalamus_rl.ThalamusCore`, the parametric half-lives of its
    heads in env steps (:meth:`thalamus_rl.DistributedMamba.half_lives`: the decay at the
    learned ``dt`` bias, for a zero ``dt`` input; what the state keeps when the input does not
    move ``dt``).

    :return: per stream name ``{"kind": "mamba", "heads", "clock", "median", "p10", "p90",
        "max"}``, or ``{"kind": "episodic", "capacity"}`` for an episodic stream (a store of
        the last ``capacity`` steps that does not decay).
    """
    summary: dict[str, dict[str, Any]] = {}
    modules = {stream.name: stream for stream in core.streams.streams}
    for name, lives in core.streams.half_lives().items():
        stream = modules[name]
        if lives.numel() == 0:
            summary[name] = {"kind": "episodic", "capacity": int(stream.capacity)}
            continue
        values = lives.detach().double().cpu().numpy()
        summary[name] = {
            "kind": "mamba",
            "heads": int(values.size),
            "clock": int(getattr(stream, "clock", 1)),
            **_spread(values),
        }
    return summary


def _rate(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def is_memory_env(env: Any) -> bool:
    """Whether ``env`` (any wrapping) is a MiniGrid-Memory env (``MemoryEnv`` or a subclass)."""
    from minigrid.envs import MemoryEnv

    return isinstance(env.unwrapped, MemoryEnv)


def _spread(values: np.ndarray) -> dict[str, float]:
    """``median``, ``p10``, ``p90`` and ``max`` of ``values``."""
    return {
        "median": float(np.median(values)),
        "p10": float(np.percentile(values, 10)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def half_lives_in_play(
    rows: list[MemoryEpisode], traces: list[EpisodeTrace], clocks: dict[str, int]
) -> dict[str, dict[str, dict[str, float]]]:
    """The half-lives the streams' inputs gave them while the cue had to be remembered.

    Over the steps of the episodes that saw the cue, from its first sighting on (a clocked
    stream: its ticks only), each head's median half-life ``ln 2 / rate * clock`` in env
    steps (:class:`StreamRecorder`'s rates), summarised over the heads like
    :func:`half_life_summary`.

    :param clocks: each Mamba stream's clock, by name.
    :return: per stream name, per iteration (``"1"``, ``"2"``, ...), ``median``, ``p10``,
        ``p90``, ``max``; empty without recorded rates or episodes that saw the cue.
    """
    seen = [i for i, row in enumerate(rows) if row.cue_seen and traces[i].decay_rates]
    summary: dict[str, dict[str, dict[str, float]]] = {}
    if not seen:
        return summary
    for key in traces[seen[0]].decay_rates:
        name, iteration = key.rsplit(" ", 1)
        clock = clocks.get(name, 1)
        parts = []
        for i in seen:
            steps = np.arange(len(traces[i].in_view))
            kept = (steps_since_seen(traces[i].in_view) >= 0) & (steps % clock == 0)
            parts.append(traces[i].decay_rates[key][kept])
        rates = np.concatenate(parts)  # [S, heads]
        if len(rates):
            per_head = np.median(np.log(2.0) / rates * clock, axis=0)
            summary.setdefault(name, {})[iteration] = _spread(per_head)
    return summary


def _thalamus_core(model: Any) -> Any:
    """The model's :class:`~thalamus_rl.ThalamusCore`, or None (an agent without one)."""
    from thalamus_rl import ThalamusCore

    core = getattr(model.policy, "core", None)
    return core if isinstance(core, ThalamusCore) else None


def lag_report(
    rows: list[MemoryEpisode],
    traces: list[EpisodeTrace],
    seed: int,
    stream_names: tuple[str, ...] = (),
) -> tuple[dict[str, Any] | None, dict[str, list[float | None]] | None]:
    """The cue probe by lag (:func:`probe_by_lag`) of the policy's features and of every
    recorded stream vector, over the steps of the episodes that saw the cue from its first
    sighting on (timeouts included), all with the same episode split; and the mean stream
    weights α per lag bin, named by ``stream_names`` (None for agents without streams).

    :return: ``({"bins", "episodes", "steps", "decision_lag", "sets": {name: per-bin
        rows}}`` or None when fewer than 2 episodes saw the cue, the weights``)``;
        ``decision_lag`` is the median, p90 and max over those episodes of the lag at their
        last step (the memory the episode asked for).
    """
    seen = [i for i, row in enumerate(rows) if row.cue_seen]
    if len(seen) < 2:
        return None, None
    lags, labels, episodes, sets, alphas = [], [], [], {}, []
    for i in seen:
        trace = traces[i]
        lag = steps_since_seen(trace.in_view)
        kept = lag >= 0
        lags.append(lag[kept])
        labels.append(np.full(int(kept.sum()), rows[i].cue == "key"))
        episodes.append(np.full(int(kept.sum()), i))
        for name, values in {"features": trace.features, **trace.streams}.items():
            sets.setdefault(name, []).append(values[kept])
        if trace.stream_weights is not None:
            alphas.append(trace.stream_weights[kept])
    lag, label, episode = np.concatenate(lags), np.concatenate(labels), np.concatenate(episodes)
    stacked = {name: np.concatenate(parts) for name, parts in sets.items()}
    weights = np.concatenate(alphas) if alphas else None
    # How long the task asked the agent to remember: the lag at each episode's last step.
    decision = np.array([steps_since_seen(traces[i].in_view)[-1] for i in seen])
    report = {
        "bins": [lag_bin_label(low, high) for low, high in LAG_BINS],
        "episodes": len(seen),
        "steps": len(lag),
        "decision_lag": {
            "median": float(np.median(decision)),
            "p90": float(np.percentile(decision, 90)),
            "max": int(decision.max()),
        },
        "sets": {
            name: probe_by_lag(values, label, lag, episode, seed=seed)
            for name, values in stacked.items()
        },
    }
    by_weight: dict[str, list[float | None]] | None = None
    if weights is not None:
        which = lag_bins(lag)
        names = stream_names or tuple(f"stream {m}" for m in range(weights.shape[1]))
        by_weight = {
            name: [
                float(weights[which == b, m].mean()) if (which == b).any() else None
                for b in range(len(LAG_BINS))
            ]
            for m, name in enumerate(names)
        }
    return report, by_weight


def diagnose(
    target: str | Path | tuple[Any, ExperimentConfig],
    episodes: int,
    env_id: str | None,
    seed: int | None,
    deterministic: bool,
    trust_pickle: bool = False,
    by_lag: bool = True,
) -> dict[str, Any]:
    """Play ``episodes`` of one run and summarise them (see the module doc).

    :param target: a run directory or model file (loaded on the CPU), or an already-loaded
        ``(model, config)`` (the benchmark runner's final model; then ``"model"`` is None).
    :param env_id: a MiniGrid-Memory env id; None: the run's own (``config.env.id``).
    :param seed: episode ``i`` resets with ``seed + i``; None: ``train.seed`` plus
        :data:`~agents.experiment.training.EVAL_SEED_OFFSET` (the eval seeds).
    :param trust_pickle: also read stable-baselines3 zips, which runs code from them.
    :param by_lag: also probe the cue at every lag since it was seen, in the policy's
        features and (ThalamusPPO) in every stream, and report the streams' half-lives
        (``lag_probe``, ``stream_weights_by_lag``, ``half_lives``; False: those are None).
        The episodes played are the same either way.
    :raises ConfigError: the run cannot be loaded, was trained on trials, or the env is not a
        MiniGrid-Memory env.
    """
    import torch as th

    import envs
    from agents.experiment.training import EVAL_SEED_OFFSET, load_model

    model_path: Path | None
    if isinstance(target, tuple):
        model, config = target
        model_path, name = None, f"the {config.agent.kind} model on {config.env.id}"
    else:
        model, config, model_path, _ = load_model(target, device="cpu", trust_pickle=trust_pickle)
        name = str(target)
    env_id = env_id or config.env.id
    if config.env.trial_episodes != 1:
        raise ConfigError(f"{name} was trained on trials; this diagnosis needs plain episodes")
    try:
        env = envs.make_env(env_id, **config.env.env_kwargs)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if not is_memory_env(env):
        env.close()
        raise ConfigError(
            f"{env_id} is not a MiniGrid-Memory env; pass --env MiniGrid-MemoryS7-v0 (or S9, "
            "S11, S13, S17)"
        )
    seed = seed if seed is not None else config.train.seed + EVAL_SEED_OFFSET
    model.policy.set_training_mode(False)
    core = _thalamus_core(model) if by_lag else None
    extractor = model.policy.features_extractor if core is not None else None
    compiled = getattr(extractor, "compile_core", False)
    th.manual_seed(seed)
    played = []
    try:
        if core is None:
            for i in range(episodes):
                played.append(play_traced(model, env, seed + i, deterministic))
        else:
            extractor.compile_core = False  # the hook runs in the eager core, the reference
            with StreamRecorder(core.streams) as recorder:
                for i in range(episodes):
                    played.append(play_traced(model, env, seed + i, deterministic, recorder))
    finally:
        if extractor is not None:
            extractor.compile_core = compiled
        env.close()

    rows = [episode for episode, _ in played]
    traces = [trace for _, trace in played]
    success = [e.outcome == "success" for e in rows]
    seen = [e.cue_seen for e in rows]
    eligible = [i for i, e in enumerate(rows) if e.cue_seen and e.outcome != "timeout"]
    probe: dict[str, Any] | None = None
    if len(eligible) >= MIN_PROBE_EPISODES:
        features = np.stack([traces[i].features[-1] for i in eligible])
        labels = np.array([rows[i].cue == "key" for i in eligible])
        probe = fit_probe(features, labels, seed=seed)
    lag_probe, weights_by_lag, half_lives, streams_note = None, None, None, None
    if by_lag:
        names = tuple(core.stream_names) if core is not None else ()
        lag_probe, weights_by_lag = lag_report(rows, traces, seed, names)
        if core is not None:
            half_lives = half_life_summary(core)
            clocks = {n: v["clock"] for n, v in half_lives.items() if v["kind"] == "mamba"}
            for name, by_iteration in half_lives_in_play(rows, traces, clocks).items():
                half_lives[name]["in_play"] = by_iteration
        else:
            streams_note = (
                f"{config.agent.kind} has no thalamus streams: no per-stream probes or "
                "half-lives (its features are probed by lag)"
            )
    return {
        "model": None if model_path is None else str(model_path),
        "env_id": env_id,
        "agent": config.agent.kind,
        "episodes": episodes,
        "deterministic": deterministic,
        "seed": seed,
        "success_rate": float(np.mean(success)),
        "cue_seen_rate": float(np.mean(seen)),
        "success_if_seen": _rate([s for s, v in zip(success, seen, strict=True) if v]),
        "success_if_unseen": _rate([s for s, v in zip(success, seen, strict=True) if not v]),
        "timeout_rate": float(np.mean([e.outcome == "timeout" for e in rows])),
        "mean_length": float(np.mean([e.length for e in rows])),
        "probe_episodes": len(eligible),
        "probe": probe,
        "lag_probe": lag_probe,
        "stream_weights_by_lag": weights_by_lag,
        "half_lives": half_lives,
        "streams_note": streams_note,
        "per_episode": [asdict(e) for e in rows],
    }


SUMMARY_KEYS = (
    "episodes",
    "success_rate",
    "cue_seen_rate",
    "success_if_seen",
    "success_if_unseen",
    "probe_episodes",
    "probe_accuracy",
    "probe_majority",
)
"""What :func:`summarize` keeps of a diagnosis (the benchmark record's ``memory_diagnosis``)."""


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The compact form of a :func:`diagnose` result: :data:`SUMMARY_KEYS`, no per-episode list.

    ``probe_accuracy`` and ``probe_majority`` are None when the probe was not fit (fewer than
    :data:`MIN_PROBE_EPISODES` episodes saw the cue and made a choice).
    """
    probe = result["probe"] or {}
    summary = {key: result[key] for key in SUMMARY_KEYS[:6]}
    summary["probe_accuracy"] = probe.get("accuracy")
    summary["probe_majority"] = probe.get("majority")
    return summary
