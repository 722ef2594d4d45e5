"""Regenerate ``envs/vocab.json``, the mission vocabulary, from the installed minigrid.

The committed JSON is the source of truth (saved models depend on its ids); this script makes it
reproducible and keeps it valid when minigrid changes:

* it enumerates every mission generator of every registered MiniGrid/BabyAI env
  (:func:`envs.missions.env_missions`) and cross-checks the words against missions sampled
  from real resets;
* existing ids never change: new words are *appended* (sorted), ``max_mission_len`` only grows,
  and ``version`` is bumped whenever anything changes;
* ``--check`` writes nothing and exits with status 1 when the file is missing words or too short.

Usage::

    .venv/bin/python scripts/build_vocab.py            # update envs/vocab.json in place
    .venv/bin/python scripts/build_vocab.py --check    # CI: is the committed file up to date?
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import minigrid

from envs.missions import babyai_grammar_missions, env_missions, sample_missions
from envs.registry import minigrid_env_ids
from envs.vocab import PAD_TOKEN, TOKENIZER, UNK_TOKEN, VOCAB_PATH, tokenize


def collect(sample_seeds: int) -> tuple[set[str], int, str, str]:
    """Words and the longest mission over all env ids.

    :return: (words, longest length in tokens, its source, the mission). The source is the
        first env id that generates the longest mission, or the BabyAI grammar as a whole.
    """
    grammar = set(babyai_grammar_missions())
    words: set[str] = set()
    longest, longest_env, longest_mission = 0, "", ""
    for env_id in minigrid_env_ids():
        missions = env_missions(env_id)
        for mission in missions:
            tokens = tokenize(mission)
            words.update(tokens)
            if len(tokens) > longest:
                source = "BabyAI instruction grammar" if mission in grammar else env_id
                longest, longest_env, longest_mission = len(tokens), source, mission
        if sample_seeds <= 0:
            continue
        try:
            sampled = sample_missions(env_id, range(sample_seeds))
        except Exception as error:  # noqa: BLE001 (an env that cannot be built cannot be sampled)
            print(f"  (not sampled: {env_id}: {type(error).__name__}: {error})")
            continue
        for mission in sampled:
            tokens = tokenize(mission)
            missed = sorted(set(tokens) - words)
            if missed:
                raise SystemExit(
                    f"{env_id}: sampled mission {mission!r} uses words {missed} that the "
                    f"enumeration of envs/missions.py did not produce; extend the enumeration"
                )
            if len(tokens) > longest:
                raise SystemExit(
                    f"{env_id}: sampled mission {mission!r} ({len(tokens)} tokens) is longer "
                    f"than the enumerated maximum {longest}; extend the enumeration"
                )
    return words, longest, longest_env, longest_mission


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=VOCAB_PATH, help="vocabulary JSON file")
    parser.add_argument(
        "--sample-seeds",
        type=int,
        default=50,
        help="reset every env with this many seeds to cross-check the enumeration (0: skip)",
    )
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # gym's "v0 is out of date" notices
        words, longest, longest_env, longest_mission = collect(args.sample_seeds)

    old = json.loads(args.output.read_text()) if args.output.exists() else None
    if old is not None and old.get("tokenizer") != TOKENIZER:
        raise SystemExit(
            f"{args.output} uses tokenizer {old.get('tokenizer')!r}, not {TOKENIZER!r}: ids "
            f"cannot be kept; delete the file to start a new vocabulary (old models break)"
        )
    table = list(old["words"]) if old else [PAD_TOKEN, UNK_TOKEN]
    new_words = sorted(words - set(table))
    max_len = max(longest, old["max_mission_len"] if old else 0)
    changed = old is None or bool(new_words) or max_len != old["max_mission_len"]
    print(
        f"{len(words)} words over {len(minigrid_env_ids())} env ids; longest mission "
        f"{longest} tokens ({longest_env}): {longest_mission!r}"
    )
    if args.check:
        if changed:
            print(f"STALE: new words {new_words}, max_mission_len {max_len}", file=sys.stderr)
            return 1
        print(f"{args.output} is up to date (version {old['version']})")
        return 0
    if not changed:
        print(f"{args.output} is up to date (version {old['version']}); nothing written")
        return 0
    data = {
        "version": (old["version"] + 1) if old else 1,
        "description": (
            "Word ids of MiniGrid/BabyAI missions for envs.MissionObservationWrapper. Ids never "
            "change within a version; regenerate with scripts/build_vocab.py (append-only)."
        ),
        "minigrid_version": minigrid.__version__,
        "tokenizer": TOKENIZER,
        "max_mission_len": max_len,
        "longest_mission": {"source": longest_env, "mission": longest_mission},
        "words": table + new_words,
    }
    args.output.write_text(json.dumps(data, indent=1) + "\n")
    print(
        f"wrote {args.output}: version {data['version']}, {len(data['words'])} ids, "
        f"max_mission_len {max_len}, appended {new_words}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
