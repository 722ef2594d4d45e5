"""MiniGrid's view geometry: which grid cell each cell of the egocentric view shows.

The ``image`` observation is the agent's ``V x V`` view (``agent_view_size``): cell
``image[i, j]`` is view column ``i`` and view row ``j`` in MiniGrid's ``gen_obs_grid``
convention, the agent at ``(V // 2, V - 1)`` looking "up". :func:`view_to_world` maps a view
cell to the grid exactly as MiniGrid's ``get_full_render`` highlights the field of view.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym

__all__ = ["DIR_TO_VEC", "view_cell_in_grid", "view_to_world"]

#: MiniGrid's ``DIR_TO_VEC``: the step ``(dx, dy)`` of each ``agent_dir`` (right, down, left, up).
DIR_TO_VEC: tuple[tuple[int, int], ...] = ((1, 0), (0, 1), (-1, 0), (0, -1))


def view_to_world(
    agent_pos: Sequence[int], agent_dir: int, view_size: int, vis_i: int, vis_j: int
) -> tuple[int, int]:
    """Grid cell ``(x, y)`` of the egocentric view cell ``(vis_i, vis_j)``.

    The inverse of MiniGrid's ``get_view_coords``: the view's top-left corner lies
    ``view_size - 1`` cells ahead and ``view_size // 2`` cells left of the agent; view
    columns run to the agent's right, view rows towards the agent.

    >>> view_to_world((3, 3), agent_dir=3, view_size=7, vis_i=3, vis_j=6)  # the agent's cell
    (3, 3)
    >>> view_to_world((3, 3), agent_dir=0, view_size=7, vis_i=3, vis_j=5)  # one step ahead
    (4, 3)
    """
    fx, fy = DIR_TO_VEC[agent_dir]
    rx, ry = -fy, fx
    top_x = agent_pos[0] + fx * (view_size - 1) - rx * (view_size // 2)
    top_y = agent_pos[1] + fy * (view_size - 1) - ry * (view_size // 2)
    return int(top_x - fx * vis_j + rx * vis_i), int(top_y - fy * vis_j + ry * vis_i)


def view_cell_in_grid(env: gym.Env, vis_i: int, vis_j: int) -> tuple[int, int] | None:
    """The grid cell ``(x, y)`` that view cell ``(vis_i, vis_j)`` of ``env``'s agent shows in
    its current state, or None when that view cell lies outside the grid.

    :param env: a MiniGrid env (any wrapper).
    """
    grid = env.unwrapped
    x, y = view_to_world(grid.agent_pos, grid.agent_dir, int(grid.agent_view_size), vis_i, vis_j)
    return (x, y) if 0 <= x < grid.width and 0 <= y < grid.height else None
