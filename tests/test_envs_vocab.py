"""The mission vocabulary: shipped file, coverage of every mission generator, injectivity."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

import envs
from envs.missions import (
    babyai_grammar_missions,
    env_missions,
    mission_space_missions,
    sample_missions,
)
from envs.registry import minigrid_env_ids
from envs.vocab import (
    PAD_ID,
    PAD_TOKEN,
    TOKENIZER,
    UNK_ID,
    UNK_TOKEN,
    VOCAB_PATH,
    MissionVocabulary,
    default_vocabulary,
    tokenize,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*is out of date:DeprecationWarning")

REPO = Path(__file__).resolve().parents[1]
ENV_IDS = minigrid_env_ids()
DEFAULT_SAMPLE_SEEDS = 20
SLOW_SAMPLE_SEEDS = 500


def fresh_vocabulary() -> MissionVocabulary:
    """The shipped table in a new instance, so its warn-once state is untouched."""
    return MissionVocabulary.from_json(VOCAB_PATH)


def assert_encodes_exactly(vocab: MissionVocabulary, mission: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown word or a truncation would warn
        ids = vocab.encode(mission)
    assert UNK_ID not in ids, mission
    assert vocab.decode(ids) == " ".join(mission.lower().split()), mission


def test_shipped_vocabulary_file_is_consistent() -> None:
    data = json.loads(VOCAB_PATH.read_text())
    assert isinstance(data["version"], int) and data["version"] >= 1
    assert data["tokenizer"] == TOKENIZER
    assert data["words"][:2] == [PAD_TOKEN, UNK_TOKEN]
    assert len(set(data["words"])) == len(data["words"])
    vocab = default_vocabulary()
    assert envs.MISSION_VOCAB_SIZE == len(vocab) == len(data["words"])
    assert envs.MAX_MISSION_LEN == vocab.max_len == data["max_mission_len"]
    assert (PAD_ID, UNK_ID) == (0, 1)


def test_tokenize_keeps_punctuation_and_lowercases() -> None:
    assert tokenize("Open the RED door, then  go") == [
        "open",
        "the",
        "red",
        "door",
        ",",
        "then",
        "go",
    ]
    assert tokenize("") == []


def test_babyai_grammar_reaches_its_longest_mission() -> None:
    missions = babyai_grammar_missions()
    lengths = [len(tokenize(m)) for m in missions]
    # put <desc> next to <desc> = 1 + 7 + 2 + 7 tokens; "and" joins two; ", then" / "after you"
    # join two of those: 2 * (2 * 17 + 1) + 2.
    assert max(lengths) == 72 == envs.MAX_MISSION_LEN
    words = {w for m in missions for w in tokenize(m)}
    for word in ["object", "behind", "left", "right", "front", "after", "then", "a", "the", ","]:
        assert word in words


def test_mission_space_enumeration_is_the_full_product() -> None:
    import gymnasium as gym

    env = gym.make("MiniGrid-LockedRoom-v0")
    missions = mission_space_missions(env.observation_space["mission"])
    assert len(missions) == len(set(missions)) == 6**3
    with pytest.raises(TypeError, match="BabyAIMissionSpace"):
        mission_space_missions(gym.make("BabyAI-GoToLocal-v0").observation_space["mission"])


def test_every_enumerated_mission_of_every_env_encodes_exactly() -> None:
    vocab = fresh_vocabulary()
    checked = set()
    for env_id in ENV_IDS:
        for mission in env_missions(env_id):
            if mission not in checked:
                checked.add(mission)
                assert_encodes_exactly(vocab, mission)
    assert len(checked) > 1000


def check_sampled_missions(env_id: str, n_seeds: int) -> None:
    try:
        missions = sample_missions(env_id, range(n_seeds))
    except FileNotFoundError as error:  # the WFC envs' pattern images are missing from the wheel
        pytest.skip(f"{env_id} cannot be constructed in this install: {error}")
    vocab = fresh_vocabulary()
    for mission in set(missions):
        assert_encodes_exactly(vocab, mission)


@pytest.mark.parametrize("env_id", ENV_IDS)
def test_sampled_missions_encode_exactly(env_id: str) -> None:
    check_sampled_missions(env_id, DEFAULT_SAMPLE_SEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("env_id", ENV_IDS)
def test_many_sampled_missions_encode_exactly(env_id: str) -> None:
    check_sampled_missions(env_id, SLOW_SAMPLE_SEEDS)


def test_different_missions_never_share_ids() -> None:
    vocab = default_vocabulary()
    missions = {m for env_id in ENV_IDS for m in env_missions(env_id)}
    for env_id in ["BabyAI-BossLevel-v0", "BabyAI-SynthLoc-v0", "MiniGrid-Fetch-8x8-N3-v0"]:
        missions.update(sample_missions(env_id, range(100)))
    seen: dict[bytes, str] = {}
    for mission in missions:
        key = vocab.encode(mission).tobytes()
        assert key not in seen, f"{mission!r} and {seen[key]!r} map to the same ids"
        seen[key] = mission


def test_encode_pads_and_is_fixed_length() -> None:
    vocab = default_vocabulary()
    ids = vocab.encode("go to the red ball")
    assert ids.shape == (envs.MAX_MISSION_LEN,) and ids.dtype == np.int64
    assert (ids[:5] > UNK_ID).all() and (ids[5:] == PAD_ID).all()
    assert (vocab.encode("") == PAD_ID).all()


def test_unknown_word_maps_to_unk_and_warns_once_per_word() -> None:
    vocab = fresh_vocabulary()
    with pytest.warns(UserWarning, match="'zebra'"):
        ids = vocab.encode("go to the zebra")
    assert ids[3] == UNK_ID and ids[4] == PAD_ID
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert (vocab.encode("pick up the zebra") == vocab.encode("pick up the zebra")).all()
    with pytest.warns(UserWarning, match="'giraffe'"):
        vocab.encode("go to the giraffe")


def test_long_mission_is_truncated_with_one_warning() -> None:
    vocab = MissionVocabulary(fresh_vocabulary().words, max_len=3, version=0)
    with pytest.warns(UserWarning, match="truncated to max_len=3"):
        ids = vocab.encode("go to the red ball")
    assert vocab.decode(ids) == "go to the"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vocab.encode("pick up the blue key")


@pytest.mark.parametrize(
    ("words", "match"),
    [
        (["<unk>", "<pad>", "go"], "must start with"),
        (["<pad>", "<unk>", "go", "go"], "duplicate"),
        (["<pad>", "<unk>", "go to"], "not single tokens"),
    ],
)
def test_malformed_vocabulary_is_rejected(words: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MissionVocabulary(words, max_len=4, version=1)


def test_wrong_tokenizer_in_file_is_rejected(tmp_path: Path) -> None:
    data = json.loads(VOCAB_PATH.read_text())
    data["tokenizer"] = "whitespace"
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rebuild it"):
        MissionVocabulary.from_json(path)


def load_build_vocab_script():
    spec = importlib.util.spec_from_file_location(
        "build_vocab", REPO / "scripts" / "build_vocab.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_script_finds_shipped_file_up_to_date_and_only_appends(tmp_path: Path) -> None:
    build_vocab = load_build_vocab_script()
    assert build_vocab.main(["--check", "--sample-seeds", "0"]) == 0

    # A vocabulary missing two words: the rebuild keeps every old id and appends the missing ones.
    data = json.loads(VOCAB_PATH.read_text())
    dropped = ["lava", "zebra-free"]  # one real word, one absent anyway
    data["words"] = [w for w in data["words"] if w not in dropped]
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(data))
    assert build_vocab.main(["--output", str(path), "--check", "--sample-seeds", "0"]) == 1
    assert build_vocab.main(["--output", str(path), "--sample-seeds", "0"]) == 0
    rebuilt = json.loads(path.read_text())
    assert rebuilt["words"][: len(data["words"])] == data["words"]
    assert rebuilt["words"][len(data["words"]) :] == ["lava"]
    assert rebuilt["version"] == data["version"] + 1
    assert rebuilt["max_mission_len"] == data["max_mission_len"]
