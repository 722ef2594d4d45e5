"""Turn a Dict observation into tokens for the thalamus, reading only the observation *space*.

What each kind of entry becomes (the tokenizer is built from the space, not from MiniGrid):

* an integer ``Box`` of shape ``[H, W, C]`` (the image; at most one): one token per cell, the
  sum of one learned embedding per channel value plus a learned 2-D position embedding; the cell
  positions, scaled to ``[0, 1]``, are also handed to the core;
* an integer 1-D ``Box`` named ``mission`` (``mission_key``): one word token per slot, id 0 is
  padding (masked out); the masked mean of the word embeddings, projected, is the task vector;
* every ``Discrete`` / ``MultiDiscrete`` entry: one learned embedding each, summed into a single
  *proprio* token;
* every float ``Box`` with at most one dimension whose key is a declared reward-feedback key
  (:func:`envs.wrappers.declare_feedback_keys`): concatenated (in the space's key order) into
  the raw feedback vector handed to the core, and, through ``symlog`` and a linear map, added to
  the proprio token as well. Any other float Box is refused with an error.

Token order (``Tokenizer.token_layout``): the ``H*W`` cells in row-major order (token ``j`` is
cell ``(j // W, j % W)``), then the proprio token, then the mission words. The words come
last so that a batch can drop the word slots that are padding in every one of its rows
(missions are padded to the longest the vocabulary allows, 72 slots, and DoorKey's has 11
words): the token count per step is then ``H*W + 1 + (longest mission in the batch)``.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from torch import nn

from envs.wrappers import feedback_keys as envs_feedback_keys

__all__ = [
    "ObservationKeys",
    "TokenLayout",
    "TokenizedObs",
    "Tokenizer",
    "classify_observation_space",
]

#: Largest number of distinct values one categorical entry may embed (an image channel, a
#: ``Discrete`` entry, a word vocabulary). Larger ranges are almost always a mis-declared space.
MAX_EMBEDDING_VALUES = 1 << 16


class TokenLayout(NamedTuple):
    """Where each kind of token sits along the token axis (``N = n_tokens``).

    :param image_key: observation key of the image, ``None`` without one.
    :param grid_shape: ``(H, W)`` of the image (``(0, 0)`` without one); token ``j < H*W`` is
        cell ``(j // W, j % W)``.
    :param image: slice of the cell tokens, ``[0, H*W)``.
    :param mission_key: observation key of the mission, ``None`` without one.
    :param mission: slice of the word tokens, ``[H*W + 1, H*W + 1 + L)``, always the last ones
        (a batch whose trailing word slots are all padding drops them; see
        :meth:`ObservationTokenizer.forward`).
    :param proprio: index of the proprio token, ``H*W``.
    :param n_tokens: ``N``, the largest number of tokens per step.
    """

    image_key: str | None
    grid_shape: tuple[int, int]
    image: slice
    mission_key: str | None
    mission: slice
    proprio: int
    n_tokens: int


class TokenizedObs(NamedTuple):
    """The tokenizer's output; ``*`` is any leading batch shape (``[B]`` or ``[B, T]``).

    :param tokens: ``[*, N, d_model]`` token embeddings.
    :param token_mask: ``[*, N]`` bool, True = valid token (padding words are False).
    :param task: ``[*, d_task]`` task vector (pooled mission, or a learned constant).
    :param feedback: ``[*, F]`` raw float signals (reward feedback), ``F = feedback_dim``
        (a single 0 when the space has no float entry).
    :param positions: ``[*, N, 2]`` cell positions in ``[0, 1]`` (0 for non-spatial tokens);
        an expanded view of one constant table.
    """

    tokens: th.Tensor
    token_mask: th.Tensor
    task: th.Tensor
    feedback: th.Tensor
    positions: th.Tensor


def _is_int_box(space: spaces.Space) -> bool:
    return isinstance(space, spaces.Box) and np.issubdtype(space.dtype, np.integer)


def _n_values(key: str, space: spaces.Box) -> int:
    """Number of embedding rows a non-negative integer Box needs (``max(high) + 1``)."""
    if np.any(space.low < 0):
        raise ValueError(
            f"Observation key {key!r}: integer Box {space} has negative lower bounds; the "
            "tokenizer embeds integer values as categories and needs low >= 0. Shift the "
            "values in an ObservationWrapper."
        )
    n = int(np.max(space.high)) + 1
    if n > MAX_EMBEDDING_VALUES:
        raise ValueError(
            f"Observation key {key!r}: integer Box {space} spans {n} values, more than the "
            f"{MAX_EMBEDDING_VALUES} the tokenizer embeds as categories. Declare tighter bounds "
            "or make the entry a float Box."
        )
    return n


def _as_index(x: th.Tensor) -> th.Tensor:
    """Integer ids as ``long``; float copies of integers (e.g. from a float buffer) are rounded."""
    return x.round().long() if x.is_floating_point() else x.long()


class _SummedEmbedding(th.autograd.Function):
    """``weight[index].sum(1)`` with a backward of one ``index_add_`` per index column.

    The same function as ``nn.EmbeddingBag(mode="sum")``, whose dense CPU backward sorts the
    indices and is several times slower on a minibatch of cells (``docs/measurements.md``,
    "summed embedding"); the gradients are identical.
    """

    @staticmethod
    def forward(ctx, weight: th.Tensor, index: th.Tensor) -> th.Tensor:  # type: ignore[override]
        ctx.save_for_backward(index)
        ctx.n_rows = weight.shape[0]
        return nn.functional.embedding_bag(index, weight, mode="sum")

    @staticmethod
    def backward(ctx, grad: th.Tensor) -> tuple[th.Tensor, None]:  # type: ignore[override]
        (index,) = ctx.saved_tensors
        grad_weight = grad.new_zeros(ctx.n_rows, grad.shape[-1])
        for column in index.unbind(1):
            grad_weight.index_add_(0, column, grad)
        return grad_weight, None


def summed_embedding(weight: th.Tensor, index: th.Tensor) -> th.Tensor:
    """``weight[index].sum(1)`` (``nn.EmbeddingBag(mode="sum")``): ``index: [M, C]``,
    ``weight: [V, d]`` -> ``[M, d]``, with the faster CPU backward of
    :class:`_SummedEmbedding` (other devices keep the native kernels)."""
    if weight.device.type != "cpu":
        return nn.functional.embedding_bag(index, weight, mode="sum")
    return _SummedEmbedding.apply(weight, index)


def symlog(x: th.Tensor) -> th.Tensor:
    """``sign(x) * log(1 + |x|)``: compresses unbounded returns into a well-scaled input."""
    return th.sign(x) * th.log1p(th.abs(x))


class ObservationKeys(NamedTuple):
    """How a Dict observation space splits into the tokenizer's kinds of entries.

    :param image_key: the integer ``[H, W, C]`` Box, or ``None``.
    :param mission_key: the integer 1-D Box of word ids, or ``None``.
    :param discrete_keys: ``Discrete`` / ``MultiDiscrete`` keys (summed into the proprio token).
    :param discrete_sizes: number of values of each discrete component, in key order.
    :param discrete_starts: smallest value of each discrete component, in key order.
    :param feedback_keys: float Box keys, concatenated in this order into the feedback vector.
    :param feedback_dim: width ``F`` of the feedback vector.
    """

    image_key: str | None
    mission_key: str | None
    discrete_keys: tuple[str, ...]
    discrete_sizes: tuple[int, ...]
    discrete_starts: tuple[int, ...]
    feedback_keys: tuple[str, ...]
    feedback_dim: int


def classify_observation_space(
    observation_space: spaces.Space,
    mission_key: str = "mission",
    feedback_keys: Collection[str] | None = None,
) -> ObservationKeys:
    """Sort the entries of a Dict observation space into the tokenizer's kinds.

    A float Box is a reward-feedback signal only if its key is declared as one: by default the
    keys the env wrappers declare (:func:`envs.wrappers.declare_feedback_keys`), so a new
    wrapper cannot change the FeedbackLayer's input without saying so.

    :param observation_space: the observation space (must be a ``spaces.Dict``).
    :param mission_key: key of the integer 1-D Box read as word ids.
    :param feedback_keys: the keys that may be feedback signals (default:
        :func:`envs.wrappers.feedback_keys`).
    :raises TypeError: the space is not a Dict.
    :raises ValueError: an entry cannot be tokenized (the message names it and the options).
    """
    declared = envs_feedback_keys() if feedback_keys is None else frozenset(feedback_keys)
    if not isinstance(observation_space, spaces.Dict):
        raise TypeError(
            f"The tokenizer needs a gymnasium.spaces.Dict observation space, got "
            f"{observation_space}. Wrap the env so that it returns a Dict (envs.make_env does)."
        )
    image_key: str | None = None
    mission: str | None = None
    discrete_keys: list[str] = []
    discrete_sizes: list[int] = []
    discrete_starts: list[int] = []
    found_feedback: list[str] = []
    feedback_dim = 0
    for key, space in observation_space.spaces.items():
        if _is_int_box(space) and len(space.shape) == 3:
            if image_key is not None:
                raise ValueError(
                    f"Observation keys {image_key!r} and {key!r} are both integer [H, W, C] "
                    "Boxes; the tokenizer reads exactly one image. Drop or merge one of them."
                )
            _n_values(key, space)  # validates the bounds
            image_key = key
        elif _is_int_box(space) and len(space.shape) == 1 and key == mission_key:
            _n_values(key, space)
            mission = key
        elif isinstance(space, spaces.Discrete):
            discrete_keys.append(key)
            discrete_sizes.append(int(space.n))
            discrete_starts.append(int(space.start))
        elif isinstance(space, spaces.MultiDiscrete) and len(space.shape) == 1:
            discrete_keys.append(key)
            discrete_sizes.extend(int(n) for n in space.nvec)
            discrete_starts.extend(int(s) for s in space.start)
        elif (
            isinstance(space, spaces.Box)
            and np.issubdtype(space.dtype, np.floating)
            and len(space.shape) <= 1
        ):
            if key not in declared:
                raise ValueError(
                    f"Observation key {key!r} is a float Box {space}, but not a declared "
                    f"reward-feedback key ({', '.join(sorted(declared)) or 'none declared'}). If "
                    "it is a reward signal for the FeedbackLayer, declare it where its wrapper "
                    "is defined with envs.wrappers.declare_feedback_keys(wrapper, key); "
                    "otherwise make it a Discrete / integer Box or drop it with an "
                    "ObservationWrapper."
                )
            found_feedback.append(key)
            feedback_dim += int(np.prod(space.shape, dtype=int))
        else:
            raise ValueError(
                f"Cannot tokenize observation key {key!r} with space {space}. Supported: an "
                "integer Box [H, W, C] (image, one token per cell), an integer 1-D Box named "
                f"{mission_key!r} (word ids), Discrete / 1-D MultiDiscrete (proprio token), "
                "declared float Box with at most one dimension (feedback signals). Convert or drop "
                "this key with an ObservationWrapper."
            )
    if max(discrete_sizes, default=0) > MAX_EMBEDDING_VALUES:
        raise ValueError(
            f"A Discrete entry of {discrete_keys} has more than {MAX_EMBEDDING_VALUES} values; "
            "declare a smaller space or make it a float Box."
        )
    return ObservationKeys(
        image_key=image_key,
        mission_key=mission,
        discrete_keys=tuple(discrete_keys),
        discrete_sizes=tuple(discrete_sizes),
        discrete_starts=tuple(discrete_starts),
        feedback_keys=tuple(found_feedback),
        feedback_dim=feedback_dim,
    )


class Tokenizer(nn.Module):
    """Embed a ``gymnasium.spaces.Dict`` observation as tokens, task and feedback vectors.

    :param observation_space: the Dict space the observations come from.
    :param d_model: token width (the core's ``d_model``).
    :param d_task: task-vector width (the core's ``d_task``).
    :param mission_key: key of the integer 1-D Box read as word ids (0 = padding).
    :param max_word_tokens: keep only the first this many mission slots as word tokens
        (``None``: all). The task vector still pools every word; use it when the space pads
        missions far beyond the longest one the env produces (fewer tokens, faster core).
    :param feedback_keys: the float Box keys that are reward feedback (default: the keys the
        env wrappers declare, :func:`envs.wrappers.feedback_keys`).

    >>> import numpy as np
    >>> from gymnasium import spaces
    >>> space = spaces.Dict({
    ...     "image": spaces.Box(0, 255, (7, 7, 3), np.uint8),
    ...     "direction": spaces.Discrete(4),
    ...     "mission": spaces.Box(0, 99, (9,), np.int64),
    ...     "prev_reward": spaces.Box(-np.inf, np.inf, (1,), np.float32),
    ... })
    >>> tok = Tokenizer(space, d_model=32, d_task=16)
    >>> tok.token_layout.n_tokens, tok.token_layout.mission, tok.feedback_dim
    (59, slice(50, 59, None), 1)
    >>> out = tok({k: th.as_tensor(np.stack([space[k].sample() for _ in range(5)]))
    ...            for k in space.keys()})
    >>> tuple(out.tokens.shape), tuple(out.task.shape), tuple(out.positions.shape)
    ((5, 59, 32), (5, 16), (5, 59, 2))
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        d_model: int,
        d_task: int,
        mission_key: str = "mission",
        max_word_tokens: int | None = None,
        feedback_keys: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        if max_word_tokens is not None and max_word_tokens < 0:
            raise ValueError(f"max_word_tokens={max_word_tokens} must be >= 0 or None.")
        keys = classify_observation_space(observation_space, mission_key, feedback_keys)
        self.observation_space = observation_space
        self.d_model = d_model
        self.d_task = d_task

        image_key, mission = keys.image_key, keys.mission_key
        self.image_key = image_key
        self.mission_key = mission
        self.discrete_keys = keys.discrete_keys
        self.feedback_keys = keys.feedback_keys
        # The core needs at least one signal: without float entries it gets a constant 0.
        self.feedback_dim = max(keys.feedback_dim, 1)
        discrete_sizes = keys.discrete_sizes
        discrete_starts = keys.discrete_starts

        # --- image cells: one EmbeddingBag over all channels (channel c's values are offset) ---
        height = width = 0
        if image_key is not None:
            image_space = observation_space[image_key]
            height, width, n_channels = image_space.shape
            channel_sizes = [
                _n_values(image_key, spaces.Box(image_space.low[..., c], image_space.high[..., c]))
                for c in range(n_channels)
            ]
            self.cell_embedding = nn.EmbeddingBag(sum(channel_sizes), d_model, mode="sum")
            self.row_embedding = nn.Embedding(height, d_model)
            self.col_embedding = nn.Embedding(width, d_model)
            self.register_buffer(
                "channel_offsets",
                th.as_tensor(np.cumsum([0, *channel_sizes[:-1]]), dtype=th.long),
                persistent=False,
            )
        n_cells = height * width

        # --- mission words ---
        n_words = 0
        if mission is not None:
            mission_space = observation_space[mission]
            n_slots = int(mission_space.shape[0])
            n_words = n_slots if max_word_tokens is None else min(max_word_tokens, n_slots)
            self.word_embedding = nn.Embedding(_n_values(mission, mission_space), d_model)
            self.word_position = nn.Embedding(n_words, d_model)
            self.task_projection = nn.Linear(d_model, d_task)
        else:
            self.task_constant = nn.Parameter(th.zeros(d_task))

        # --- proprio token: Discrete embeddings (one EmbeddingBag) + projected feedback ---
        if self.discrete_keys:
            self.discrete_embedding = nn.EmbeddingBag(sum(discrete_sizes), d_model, mode="sum")
            self.register_buffer(
                "discrete_offsets",
                th.as_tensor(np.cumsum([0, *discrete_sizes[:-1]]), dtype=th.long),
                persistent=False,
            )
            self.register_buffer(
                "discrete_starts", th.as_tensor(discrete_starts, dtype=th.long), persistent=False
            )
        if self.feedback_keys:
            self.feedback_projection = nn.Linear(self.feedback_dim, d_model)

        # One learned type vector per kind of token (cell, word, proprio).
        self.type_embedding = nn.Embedding(3, d_model)
        self.token_norm = nn.LayerNorm(d_model)

        n_tokens = n_cells + 1 + n_words
        self.token_layout = TokenLayout(
            image_key=image_key,
            grid_shape=(height, width),
            image=slice(0, n_cells),
            mission_key=mission,
            mission=slice(n_cells + 1, n_tokens),
            proprio=n_cells,
            n_tokens=n_tokens,
        )
        positions = th.zeros(n_tokens, 2)
        if n_cells:
            rows = th.arange(height, dtype=th.float32) / max(height - 1, 1)
            cols = th.arange(width, dtype=th.float32) / max(width - 1, 1)
            positions[:n_cells] = th.stack(th.meshgrid(rows, cols, indexing="ij"), -1).reshape(
                -1, 2
            )
        self.register_buffer("positions", positions, persistent=False)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
                nn.init.normal_(module.weight, std=0.5)

    @property
    def n_tokens(self) -> int:
        """``N``, the number of tokens per step."""
        return self.token_layout.n_tokens

    def _batch_shape(self, obs: Mapping[str, th.Tensor]) -> tuple[th.Size, th.device]:
        """The leading batch shape ``*`` of ``obs`` (read from its first key)."""
        key, space = next(iter(self.observation_space.spaces.items()))
        if key not in obs:
            raise KeyError(
                f"Observation is missing key {key!r}; expected keys {list(self.observation_space)}."
            )
        x = obs[key]
        n_space_dims = len(space.shape)
        return x.shape[: x.dim() - n_space_dims], x.device

    def forward(self, obs: Mapping[str, th.Tensor]) -> TokenizedObs:
        """Tokenize a batch of observations.

        :param obs: one tensor per key, each ``[*, *space.shape]`` (``*`` any batch shape, the
            same for every key). Integer entries may arrive as float (they are rounded).
        :return: a :class:`TokenizedObs` with leading shape ``*`` and ``N' <= n_tokens`` tokens:
            the layout's tokens up to the last word slot that holds a word in some row of the
            batch (the dropped slots are padding everywhere, so no output depends on them).
        """
        batch_shape, device = self._batch_shape(obs)
        m = int(np.prod(batch_shape, dtype=int))  # flat batch size
        d = self.d_model
        types = self.type_embedding.weight
        parts: list[th.Tensor] = []
        masks: list[th.Tensor] = []

        if self.image_key is not None:
            height, width = self.token_layout.grid_shape
            image = _as_index(obs[self.image_key].reshape(m * height * width, -1))
            cells = summed_embedding(self.cell_embedding.weight, image + self.channel_offsets).view(
                m, height * width, d
            )
            # Position and type as one [H*W, d] table, added once: the backward then reduces
            # one [m, H*W, d] gradient instead of one per broadcast term.
            table = self.row_embedding.weight[:, None, :] + self.col_embedding.weight + types[0]
            parts.append(cells + table.view(height * width, d))
            masks.append(th.ones(m, height * width, dtype=th.bool, device=device))

        proprio = types[2].expand(m, d)
        if self.discrete_keys:
            values = _as_index(th.cat([obs[k].reshape(m, -1) for k in self.discrete_keys], dim=1))
            proprio = proprio + summed_embedding(
                self.discrete_embedding.weight,
                values - self.discrete_starts + self.discrete_offsets,
            )
        if self.feedback_keys:
            feedback = th.cat([obs[k].reshape(m, -1) for k in self.feedback_keys], dim=1)
            feedback = feedback.to(proprio.dtype)  # the module's dtype (float64 in a .double())
            proprio = proprio + self.feedback_projection(symlog(feedback))
        else:
            feedback = th.zeros(m, 1, device=device, dtype=proprio.dtype)
        parts.append(proprio.unsqueeze(1))
        masks.append(th.ones(m, 1, dtype=th.bool, device=device))

        if self.mission_key is not None:
            ids = _as_index(obs[self.mission_key].reshape(m, -1))
            # Slots past the longest mission of the batch are padding in every row: they are
            # masked out of the pooling and of the gate anyway, so dropping them is exact.
            used_slots = (ids != 0).any(0).nonzero()  # one host sync per call
            n_slots = int(used_slots[-1]) + 1 if len(used_slots) else 0
            ids = ids[:, :n_slots]
            word_mask = ids != 0
            words = self.word_embedding(ids)  # [m, L', d]
            weights = word_mask.to(words.dtype).unsqueeze(-1)
            pooled = (words * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            task = self.task_projection(pooled)
            n_words = min(n_slots, self.word_position.num_embeddings)
            parts.append(words[:, :n_words] + (self.word_position.weight[:n_words] + types[1]))
            masks.append(word_mask[:, :n_words])
        else:
            task = self.task_constant.expand(m, self.d_task)

        tokens = self.token_norm(th.cat(parts, dim=1))
        n = tokens.shape[1]
        return TokenizedObs(
            tokens=tokens.view(*batch_shape, n, d),
            token_mask=th.cat(masks, dim=1).view(*batch_shape, n),
            task=task.reshape(*batch_shape, self.d_task),
            feedback=feedback.view(*batch_shape, self.feedback_dim),
            positions=self.positions[:n].expand(*batch_shape, n, 2),
        )
