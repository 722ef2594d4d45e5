"""The fixed, versioned word vocabulary that turns MiniGrid/BabyAI missions into int64 ids.

The vocabulary lives in ``envs/vocab.json`` (package data, the source of truth). It is built by
``scripts/build_vocab.py`` from every mission the installed minigrid can generate (see
:mod:`envs.missions`); saved models stay valid as long as the file's ``version`` is unchanged,
because the rebuild only ever *appends* words. Id 0 is padding, id 1 is the unknown word.

Tokenization is lossless up to case and whitespace: the mission is lower-cased and split into
runs of word characters and single punctuation marks (``"door, then"`` -> ``door , then``), so two
different missions of the same env never map to the same ids.
"""

from __future__ import annotations

import functools
import json
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

__all__ = [
    "PAD_ID",
    "UNK_ID",
    "PAD_TOKEN",
    "UNK_TOKEN",
    "TOKENIZER",
    "VOCAB_PATH",
    "MissionVocabulary",
    "tokenize",
    "default_vocabulary",
]
# MISSION_VOCAB_SIZE and MAX_MISSION_LEN are module attributes too (see __getattr__ below).

PAD_ID = 0
UNK_ID = 1
PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
#: Identifies the tokenization rule; stored in the JSON so a changed rule cannot silently
#: reinterpret an old vocabulary.
TOKENIZER = r"lowercase; tokens = regex \w+|[^\w\s]"
VOCAB_PATH = Path(__file__).with_name("vocab.json")

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def tokenize(mission: str) -> list[str]:
    """Split a mission into lower-case word and punctuation tokens.

    :param mission: a mission string, e.g. ``"open the red door, then open the blue door"``.
    :return: its tokens, e.g. ``["open", "the", "red", "door", ",", "then", ...]``.

    >>> tokenize("Get the red key from the blue room, unlock the door")
    ['get', 'the', 'red', 'key', 'from', 'the', 'blue', 'room', ',', 'unlock', 'the', 'door']
    """
    return _TOKEN_RE.findall(mission.lower())


class MissionVocabulary:
    """A word <-> id table with a fixed mission length.

    Unknown words map to :data:`UNK_ID` with one warning per distinct word; missions longer
    than ``max_len`` tokens are truncated with one warning (per vocabulary instance). Never raises
    on a mission.

    :param words: the id -> word table; ``words[0]`` must be ``"<pad>"`` and ``words[1]``
        ``"<unk>"``, all words unique.
    :param max_len: length of every encoded mission (padded with :data:`PAD_ID`).
    :param version: version of the table; bump it whenever ids or ``max_len`` change.

    >>> vocab = default_vocabulary()
    >>> ids = vocab.encode("go to the red ball")
    >>> ids.shape == (vocab.max_len,), ids.dtype
    (True, dtype('int64'))
    >>> vocab.decode(ids)
    'go to the red ball'
    """

    def __init__(self, words: Iterable[str], max_len: int, version: int) -> None:
        words = list(words)
        if words[:2] != [PAD_TOKEN, UNK_TOKEN]:
            raise ValueError(
                f"a mission vocabulary must start with {[PAD_TOKEN, UNK_TOKEN]} (ids 0 and 1), "
                f"got {words[:2]}"
            )
        duplicates = sorted({w for w in words if words.count(w) > 1})
        if duplicates:
            raise ValueError(f"duplicate words in the mission vocabulary: {duplicates}")
        bad = [w for w in words[2:] if tokenize(w) != [w]]
        if bad:
            raise ValueError(
                f"vocabulary entries {bad} are not single tokens under the tokenizer "
                f"({TOKENIZER}); rebuild the vocabulary with scripts/build_vocab.py"
            )
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        self.words: tuple[str, ...] = tuple(words)
        self.max_len = int(max_len)
        self.version = int(version)
        self.word_to_id: dict[str, int] = {w: i for i, w in enumerate(self.words)}
        self._warned_unknown: set[str] = set()
        self._warned_truncation = False

    def __len__(self) -> int:
        return len(self.words)

    def __repr__(self) -> str:
        return (
            f"MissionVocabulary(version={self.version}, size={len(self)}, max_len={self.max_len})"
        )

    @classmethod
    def from_json(cls, path: str | Path = VOCAB_PATH) -> MissionVocabulary:
        """Load a vocabulary written by ``scripts/build_vocab.py``.

        :param path: the JSON file; defaults to the one shipped with this package.
        """
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("tokenizer") != TOKENIZER:
            raise ValueError(
                f"{path} was built with tokenizer {data.get('tokenizer')!r}, but this code "
                f"tokenizes with {TOKENIZER!r}; rebuild it with scripts/build_vocab.py"
            )
        return cls(words=data["words"], max_len=data["max_mission_len"], version=data["version"])

    def encode(self, mission: str) -> np.ndarray:
        """Map a mission to a fixed-length id vector.

        :param mission: the mission string.
        :return: ids: ``[max_len]`` int64, the word ids followed by :data:`PAD_ID` padding. The
            array is read-only, so callers may cache and share it.
        """
        tokens = tokenize(mission)
        if len(tokens) > self.max_len:
            if not self._warned_truncation:
                self._warned_truncation = True
                warnings.warn(
                    f"mission of {len(tokens)} tokens truncated to max_len={self.max_len}: "
                    f"{mission!r}. Rebuild the vocabulary with a larger max_mission_len "
                    f"(scripts/build_vocab.py) if this env matters. (Warned once.)",
                    stacklevel=2,
                )
            tokens = tokens[: self.max_len]
        ids = np.zeros(self.max_len, dtype=np.int64)
        lookup = self.word_to_id
        for i, token in enumerate(tokens):
            index = lookup.get(token)
            if index is None:
                index = UNK_ID
                if token not in self._warned_unknown:
                    self._warned_unknown.add(token)
                    warnings.warn(
                        f"word {token!r} of mission {mission!r} is not in the mission vocabulary "
                        f"(version {self.version}); it maps to the unknown id {UNK_ID}. Rebuild "
                        f"envs/vocab.json with scripts/build_vocab.py to add it. (Warned once "
                        f"per word.)",
                        stacklevel=2,
                    )
            ids[i] = index
        ids.flags.writeable = False
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Map ids back to text, dropping padding (inverse of :meth:`encode` up to spacing).

        :param ids: ``[L]`` word ids.
        """
        words = [self.words[int(i)] for i in ids if int(i) != PAD_ID]
        text = " ".join(words)
        return re.sub(r" (?=[^\w\s<])", "", text)  # re-attach punctuation: "door , then"


@functools.cache
def default_vocabulary() -> MissionVocabulary:
    """The vocabulary shipped in ``envs/vocab.json``, loaded once per process and shared by all
    wrappers (so each unknown word and the truncation are warned about once per process)."""
    return MissionVocabulary.from_json(VOCAB_PATH)


def __getattr__(name: str) -> int:
    # The constants are computed on first use (PEP 562), so that importing this module never
    # needs vocab.json: scripts/build_vocab.py can still run when the file is missing or stale.
    if name == "MISSION_VOCAB_SIZE":
        # Number of ids (padding and unknown included); ``mission`` values lie in [0, size).
        return len(default_vocabulary())
    if name == "MAX_MISSION_LEN":
        # Length of every encoded ``mission`` observation.
        return default_vocabulary().max_len
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
