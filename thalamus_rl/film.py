"""FiLM: feature-wise linear modulation of a tensor by a conditioning vector (the task).

``FiLM(x, c) = x * (1 + gamma(c)) + beta(c)`` with ``gamma, beta`` one linear map of ``c``
(Perez et al., 2018; BabyAI's agents condition their visual features on the instruction
this way). The map starts at zero, so a fresh FiLM is the identity and a model that turns
it on starts as the same function as the model without it; the ``1 +`` keeps the identity
a zero of the parameters, so weight decay or a small learning rate pull towards it.

The core uses three (``ThalamusConfig.film_tokens / film_gate / film_streams``): on every
observation token before the gate, on the gate's salience query, and on each stream's input.
All are per time step, so the step and sequence schedules stay the same function.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FiLM"]


class FiLM(nn.Module):
    """Per-channel scale and shift of ``x`` computed from a conditioning vector.

    :param d_cond: width of the conditioning vector ``c``.
    :param d_features: channels of ``x`` (its last dimension).
    :param n_groups: independent modulations for a ``[..., n_groups, d_features]`` input
        (e.g. one per stream); 1 for a plain ``[..., d_features]`` input or tokens.

    >>> import torch
    >>> film = FiLM(d_cond=4, d_features=8)
    >>> x, c = torch.randn(3, 5, 8), torch.randn(3, 4)
    >>> bool(torch.equal(film(x, c), x))  # identity at initialisation
    True
    """

    def __init__(self, d_cond: int, d_features: int, n_groups: int = 1) -> None:
        super().__init__()
        for name, value in (("d_cond", d_cond), ("d_features", d_features), ("n_groups", n_groups)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"FiLM: {name} must be a positive int, got {value!r}.")
        self.d_cond = d_cond
        self.d_features = d_features
        self.n_groups = n_groups
        self.proj = nn.Linear(d_cond, 2 * n_groups * d_features)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def scale_shift(self, cond: Tensor) -> tuple[Tensor, Tensor]:
        """``(1 + gamma, beta)``, each ``[S, n_groups, d_features]`` (``[S, d]`` for one group).

        :param cond: ``[S, d_cond]``.
        """
        out = self.proj(cond)
        if self.n_groups > 1:
            out = out.unflatten(-1, (self.n_groups, 2 * self.d_features))
        gamma, beta = out.chunk(2, dim=-1)
        return 1.0 + gamma, beta

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        """Modulate ``x`` by ``cond``.

        :param x: ``[S, *mid, d_features]`` with ``*mid`` any dims the modulation broadcasts
            over (``[S, N, d]`` tokens share one modulation per step); with ``n_groups > 1``,
            ``[S, n_groups, d_features]``.
        :param cond: ``[S, d_cond]``.
        :return: the modulated ``x``, same shape.
        """
        if cond.shape[:1] != x.shape[:1] or cond.shape[-1] != self.d_cond or cond.dim() != 2:
            raise ValueError(
                f"FiLM: cond must be [S, d_cond={self.d_cond}] with S = x.shape[0] = "
                f"{x.shape[0]}, got {tuple(cond.shape)}."
            )
        scale, shift = self.scale_shift(cond)
        if self.n_groups > 1:
            if x.shape[1:] != (self.n_groups, self.d_features):
                raise ValueError(
                    f"FiLM: x must be [S, n_groups={self.n_groups}, d_features="
                    f"{self.d_features}], got {tuple(x.shape)}."
                )
            return x * scale + shift
        if x.shape[-1] != self.d_features:
            raise ValueError(
                f"FiLM: x must end with d_features={self.d_features}, got {tuple(x.shape)}."
            )
        view = (x.shape[0],) + (1,) * (x.dim() - 2) + (self.d_features,)
        return x * scale.view(view) + shift.view(view)

    def extra_repr(self) -> str:
        return f"d_cond={self.d_cond}, d_features={self.d_features}, n_groups={self.n_groups}"
