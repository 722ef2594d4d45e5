"""A self-supervised memory objective: predict the views of ``k`` steps ago from the core's
features now (``thalamus_ppo.aux_past_view_coef``).

On MiniGrid-Memory looking at the cue and remembering it arrive together: a policy whose core
does not keep the cue gains nothing by looking at it, so it never learns to look
(``docs/exploration.md``). This loss makes the core keep recent views whatever the reward says
(Trinh et al. 2018, "Learning longer-term dependencies in RNNs with auxiliary losses"; the
reconstruction auxiliaries of memory RL). It holds for any observation with an integer
``[H, W, C]`` image (every MiniGrid and BabyAI env): no per-env knowledge.

**What is predicted.** For each lag ``k`` in ``lags`` and each step ``t`` of a minibatch's env
columns, the image seen at ``t - k``: every cell's value in every channel, as a category
(MiniGrid: object, colour, state), with a cross-entropy per cell and channel.

**From what.** The core's output features (``ThalamusOutput.features``, the workspace both the
actor's and the critic's MLPs read), not the actor's latent: the gradient should reach the
streams, which hold the memory, without passing through and reshaping the 64-unit tanh layer
that the action head reads; and what the core keeps in its workspace is what the actor can use.
With ``policy.critic_trunk = separate`` it is the actor's core.

**Masked.** A target exists only where ``t - k`` is inside the minibatch's sequence and in the
same episode as ``t`` (no episode start in ``(t - k, t]``): the state at the sequence's start
may remember earlier steps, but their views are not in the minibatch, and across an episode
start there is nothing the core should remember.

**Which classes.** Image spaces are often declared wider than the values they hold (MiniGrid's
is ``0-255`` per channel, holding 11 objects, 6 colours, 3 states), and a softmax over 256
values per cell, channel, lag and step would cost more than the core's update. The softmax of
each channel runs over the values of that channel that occur anywhere in the minibatch's images
(a superset of every target's class): exact for the classes the data has, and as cheap as the
data is simple. The classifier keeps one row per value the space allows, so the parameters
do not depend on the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch as th
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from agents.constants import check_lags

__all__ = [
    "PAST_VIEW_CELL_DIM",
    "PastViewHead",
    "PastViewLoss",
    "check_lags",
    "past_view_mask",
    "past_view_targets",
]

#: Width of each cell's latent, from which the per-channel classifiers read (per lag and cell).
PAST_VIEW_CELL_DIM = 16


class PastViewLoss(NamedTuple):
    """The auxiliary loss of one minibatch.

    :param loss: scalar: the mean over lags of each lag's mean cross-entropy per valid
        (step, cell, channel), in nats; a lag without a valid target adds 0.
    :param accuracy: ``[L]`` per lag, the fraction of valid (step, cell, channel) whose most
        likely value is the true one (NaN where the lag has no valid target).
    :param n_valid: ``[L]`` per lag, the number of valid steps.
    :param changed_accuracy: ``[L]`` per lag, the accuracy over the valid entries whose value
        at ``t - k`` differs from the same cell and channel at ``t``: what the features must
        remember, not read off the current view (most of a MiniGrid view is walls and floor
        that ``accuracy`` gets right without memory). NaN where there is none.
    """

    loss: th.Tensor
    accuracy: th.Tensor
    n_valid: th.Tensor
    changed_accuracy: th.Tensor


def past_view_mask(episode_starts: th.Tensor, lag: int) -> th.Tensor:
    """``[B, T - lag]`` bool: True where step ``t = lag + i`` has a target at ``t - lag``, i.e.
    no episode starts in ``(t - lag, t]`` (``episode_starts[:, t]`` means observation ``t``
    begins an episode).

    :param episode_starts: ``[B, T]`` bool.
    :param lag: ``k >= 1``.
    """
    episode = th.cumsum(episode_starts.long(), dim=1)
    return episode[:, lag:] == episode[:, :-lag]


def past_view_targets(
    values: th.Tensor, episode_starts: th.Tensor, lag: int
) -> tuple[th.Tensor, th.Tensor]:
    """The targets of ``lag``: ``(valid, targets)``.

    :param values: ``[B, T, *]`` what was seen at every step.
    :param episode_starts: ``[B, T]`` bool.
    :param lag: ``k >= 1``.
    :return: ``valid``, ``[B, T - lag]`` bool (:func:`past_view_mask`: entry ``i`` is step
        ``t = lag + i``), and ``targets``, ``[V, *]``, ``values[b, t - lag]`` of the ``V`` valid
        ``(b, t)`` in row-major order (the order of ``x[:, lag:][valid]``).
    """
    steps = episode_starts.shape[1]
    if lag >= steps:
        valid = episode_starts.new_zeros((episode_starts.shape[0], 0), dtype=th.bool)
        return valid, values[:, :0].reshape(0, *values.shape[2:])
    valid = past_view_mask(episode_starts, lag)
    return valid, values[:, : steps - lag][valid]


class PastViewHead(nn.Module):
    """Predicts the image of ``k`` steps ago, for each lag ``k``, from features ``[*, F]``.

    Per lag and cell a linear map of the features to a ``PAST_VIEW_CELL_DIM`` latent (ReLU),
    then one linear classifier per channel shared by lags and cells.

    :param features_dim: ``F``, the width of the features read.
    :param image_space: the integer ``[H, W, C]`` Box of the image.
    :param lags: the lags, each ``>= 1``.
    """

    def __init__(self, features_dim: int, image_space: spaces.Box, lags: Sequence[int]) -> None:
        super().__init__()
        self.lags = check_lags(lags)
        height, width, n_channels = image_space.shape
        self.n_cells = height * width
        self.n_channels = n_channels
        channel_sizes = [int(image_space.high[..., c].max()) + 1 for c in range(n_channels)]
        self.channel_sizes = tuple(channel_sizes)
        self.cells = nn.Linear(features_dim, len(self.lags) * self.n_cells * PAST_VIEW_CELL_DIM)
        self.classifiers = nn.ModuleList(nn.Linear(PAST_VIEW_CELL_DIM, n) for n in channel_sizes)

    def forward(
        self, features: th.Tensor, images: th.Tensor, episode_starts: th.Tensor
    ) -> PastViewLoss:
        """The loss of one minibatch of whole sequences.

        :param features: ``[B, T, F]`` the core's features at every step.
        :param images: ``[B, T, H, W, C]`` the images seen (any integer or integral float dtype).
        :param episode_starts: ``[B, T]`` bool.
        """
        batch, steps = episode_starts.shape
        images = images.reshape(batch, steps, self.n_cells, self.n_channels)
        images = images.round().long() if images.is_floating_point() else images.long()
        # Per channel: the values present in the minibatch (sorted) and each cell's index in them.
        channels = images.movedim(-1, 0).contiguous()  # [C, B, T, cells]
        present = [th.unique(channel) for channel in channels]
        class_index = th.stack(
            [
                th.searchsorted(values, channel)
                for values, channel in zip(present, channels, strict=True)
            ],
            -1,
        )  # [B, T, cells, C]
        latent = F.relu(self.cells(features)).view(
            batch, steps, len(self.lags), self.n_cells, PAST_VIEW_CELL_DIM
        )
        losses, accuracies, counts, changed_accuracies = [], [], [], []
        nan = features.new_full((), float("nan"))
        zero = features.new_zeros(())
        for i, lag in enumerate(self.lags):
            valid, targets = past_view_targets(class_index, episode_starts, lag)
            n_valid = valid.sum()
            counts.append(n_valid)
            if int(n_valid) == 0:
                losses.append(zero)
                accuracies.append(nan)
                changed_accuracies.append(nan)
                continue
            z = latent[:, lag:, i][valid]  # [V, cells, d]; targets: [V, cells, C]
            changed = targets != class_index[:, lag:][valid]  # [V, cells, C]
            total = zero
            correct = zero
            correct_changed = zero
            for c, classifier in enumerate(self.classifiers):
                rows = present[c]
                logits = F.linear(z, classifier.weight[rows], classifier.bias[rows])
                target = targets[..., c]
                total = total + F.cross_entropy(
                    logits.reshape(-1, rows.numel()), target.reshape(-1), reduction="sum"
                )
                hit = logits.detach().argmax(-1) == target
                correct = correct + hit.sum()
                correct_changed = correct_changed + (hit & changed[..., c]).sum()
            n_entries = n_valid * self.n_cells * self.n_channels
            losses.append(total / n_entries)
            accuracies.append(correct / n_entries)
            n_changed = changed.sum()
            changed_accuracies.append(correct_changed / n_changed if int(n_changed) else nan)
        return PastViewLoss(
            loss=th.stack(losses).mean(),
            accuracy=th.stack(accuracies).detach(),
            n_valid=th.stack(counts),
            changed_accuracy=th.stack(changed_accuracies).detach(),
        )
