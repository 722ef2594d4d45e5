"""Enumerate the missions the installed minigrid can generate, to build and test the vocabulary.

Two generators exist in minigrid:

* MiniGrid envs declare a :class:`~minigrid.core.mission.MissionSpace`: a mission function and,
  per argument, the list of values it can take. We enumerate the full Cartesian product.
* BabyAI levels build an instruction tree from ``minigrid.envs.babyai.core.verifier`` (object
  descriptions of a type, colour and location, inside go-to / pick-up / open / put-next
  clauses, joined by "and", ", then" and "after you") and render it with its ``surface``
  methods. We run those very ``surface`` methods over every object description and every
  instruction kind, so the words come from the installed package, not from a copy of its
  grammar.

Both are cross-checked in the tests against missions sampled from real resets.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Iterable, Sequence

import gymnasium as gym
from minigrid.core.constants import COLOR_NAMES
from minigrid.core.mission import MissionSpace
from minigrid.envs.babyai.core.roomgrid_level import BabyAIMissionSpace
from minigrid.envs.babyai.core.verifier import (
    LOC_NAMES,
    OBJ_TYPES,
    AfterInstr,
    AndInstr,
    BeforeInstr,
    GoToInstr,
    ObjDesc,
    OpenInstr,
    PickupInstr,
    PutNextInstr,
)

from envs.vocab import tokenize
from envs.wrappers import QuietLevelSamplingWrapper

__all__ = [
    "babyai_grammar_missions",
    "mission_space_missions",
    "env_missions",
    "sample_missions",
]


class _EnumeratedObjDesc(ObjDesc):
    """An :class:`ObjDesc` that matches ``n_matches`` imaginary objects instead of searching a grid,
    so its own ``surface`` method renders it ("the" for one match, "a" for several)."""

    def __init__(self, type: str | None, color: str | None, loc: str | None, n_matches: int):
        super().__init__(type, color, loc)
        self._n_matches = n_matches

    def find_matching_objs(self, env: object, use_location: bool = True) -> tuple[list, list]:
        self.obj_set = [None] * self._n_matches
        self.obj_poss = [(0, 0)] * self._n_matches
        return self.obj_set, self.obj_poss


def _n_tokens(text: str) -> int:
    return len(tokenize(text))


def babyai_grammar_missions() -> list[str]:
    """Missions that, together, use every word BabyAI's instruction grammar can produce, and that
    include its longest mission.

    Each instruction is a concatenation of slots (verb, object description, connector), so its
    token count is the sum over slots: enumerating every value of one slot while the other slots
    hold their longest value covers every word and reaches the maximal length. Object
    descriptions range over type in ``OBJ_TYPES`` or none ("object"), colour in ``COLOR_NAMES`` or
    none, location in ``LOC_NAMES`` or none, and one or several matches ("the" / "a").

    :return: mission strings rendered by the installed package's ``surface`` methods.
    """
    descs = [
        _EnumeratedObjDesc(obj_type, color, loc, n_matches)
        for obj_type in (None, *OBJ_TYPES)
        for color in (None, *COLOR_NAMES)
        for loc in (None, *LOC_NAMES)
        for n_matches in (1, 2)
    ]
    not_door = [d for d in descs if d.type != "door"]
    doors = [d for d in descs if d.type == "door"]

    def longest(candidates: Sequence[ObjDesc]) -> ObjDesc:
        return max(candidates, key=lambda d: _n_tokens(d.surface(None)))

    longest_any, longest_not_door = longest(descs), longest(not_door)
    actions = (
        [GoToInstr(d) for d in descs]
        + [PickupInstr(d) for d in not_door]
        + [OpenInstr(d) for d in doors]
        + [PutNextInstr(d, longest_any) for d in not_door]
        + [PutNextInstr(longest_not_door, d) for d in descs]
    )
    surfaces = [a.surface(None) for a in actions]
    longest_action = actions[max(range(len(actions)), key=lambda i: _n_tokens(surfaces[i]))]
    longest_and = AndInstr(longest_action, longest_action)
    sequences = [
        BeforeInstr(longest_and, longest_and),
        AfterInstr(longest_and, longest_and),
    ]
    return surfaces + [longest_and.surface(None)] + [s.surface(None) for s in sequences]


def mission_space_missions(space: MissionSpace, limit: int = 1_000_000) -> list[str]:
    """Every mission of a MiniGrid :class:`MissionSpace`: its function over the Cartesian product
    of its placeholder lists.

    :param space: the env's ``observation_space["mission"]``; not a BabyAI mission space (those
        accept any string; use :func:`babyai_grammar_missions`).
    :param limit: refuse products larger than this (a safety net; the largest in minigrid 3.2
        has 324 missions).
    """
    if isinstance(space, BabyAIMissionSpace):
        raise TypeError(
            "a BabyAIMissionSpace does not list its missions; use babyai_grammar_missions()"
        )
    if space.ordered_placeholders is None:
        return [space.mission_func()]
    size = 1
    for values in space.ordered_placeholders:
        size *= len(values)
    if size > limit:
        raise ValueError(
            f"mission space {space!r} has {size} missions, more than limit={limit}; "
            f"raise the limit if you really want to enumerate it"
        )
    return [space.mission_func(*args) for args in itertools.product(*space.ordered_placeholders)]


def env_missions(env_id: str) -> list[str]:
    """Missions that cover every word (and the longest mission) that ``env_id`` can generate.

    MiniGrid envs: their full mission space. BabyAI levels: :func:`babyai_grammar_missions`.
    Envs that cannot be constructed in this install (e.g. the WFC envs, whose pattern images
    are missing from some minigrid wheels) fall back to their class's zero-argument
    ``_gen_mission``.

    :param env_id: a registered MiniGrid/BabyAI env id.
    :raises RuntimeError: when the env can neither be built nor offers a static mission.
    """
    try:
        env = gym.make(env_id, disable_env_checker=True)
    except Exception as error:  # noqa: BLE001 (any construction failure triggers the fallback)
        entry_point = gym.registry[env_id].entry_point
        if not isinstance(entry_point, str):
            raise RuntimeError(f"cannot construct {env_id!r}: {error}") from error
        module_name, class_name = entry_point.split(":")
        env_class = getattr(importlib.import_module(module_name), class_name)
        gen = getattr(env_class, "_gen_mission", None)
        if gen is None or gen.__code__.co_argcount != 0:
            raise RuntimeError(
                f"cannot construct {env_id!r} ({error}) and its class has no static mission"
            ) from error
        return [gen()]
    try:
        space = env.observation_space["mission"]
    finally:
        env.close()
    if isinstance(space, BabyAIMissionSpace):
        return babyai_grammar_missions()
    return mission_space_missions(space)


def sample_missions(env_id: str, seeds: Iterable[int]) -> list[str]:
    """The missions of ``env_id`` after ``reset(seed=s)`` for each seed (BabyAI's rejection-sampling
    messages are kept off stdout by :class:`envs.wrappers.QuietLevelSamplingWrapper`).

    :param env_id: a constructible MiniGrid/BabyAI env id.
    :param seeds: reset seeds.
    """
    env = QuietLevelSamplingWrapper(gym.make(env_id, disable_env_checker=True))
    missions = []
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=int(seed))
            missions.append(obs["mission"])
    finally:
        env.close()
    return missions
