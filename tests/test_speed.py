"""The alternated speed benchmark (agents/bench/speed.py): ratios within rounds, tables, workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from agents.bench.speed import (
    Cell,
    Worker,
    fps_markdown,
    fps_ratios,
    measure_fps,
    split_overrides,
    threshold_markdown,
)


def _result() -> dict:
    cells = [
        {"env": "E", "threads": 1, "name": "thalamus"},
        {"env": "E", "threads": 1, "name": "lstm"},
    ]
    # The machine is twice as slow in round 2: both cells slow down, the ratio stays 2.
    rounds = [
        [
            {"seconds": 1.0, "cpu_seconds": 1.0, "steps": 1000},
            {"seconds": 2.0, "cpu_seconds": 2.0, "steps": 1000},
        ],
        [
            {"seconds": 2.0, "cpu_seconds": 1.0, "steps": 1000},
            {"seconds": 4.0, "cpu_seconds": 2.0, "steps": 1000},
        ],
        [
            {"seconds": 1.0, "cpu_seconds": 1.0, "steps": 1000},
            {"seconds": 1.0, "cpu_seconds": 1.0, "steps": 1000},
        ],
    ]
    return {"cells": cells, "init_seconds": [3.0, 4.0], "rounds": rounds}


def test_ratios_are_taken_within_each_round() -> None:
    assert fps_ratios(_result(), 0, 1) == [2.0, 2.0, 1.0]
    table = fps_markdown(_result(), baselines=("lstm",))
    assert "**E, 1 thread per run**" in table
    # thalamus: fps 1000, 500, 1000 -> median 1000; ratio to lstm median 2.00 (1.00-2.00).
    assert "| thalamus | 1000 (500-1000) | 1.00 | 3 | 2.00 (1.00-2.00)x |" in table
    assert "| lstm | 500 (250-1000) | 1.00 | 4 | 1 |" in table


def test_threshold_table_says_when_a_cell_did_not_reach_it() -> None:
    result = {
        "cells": [{"name": "thalamus"}, {"name": "ppo"}],
        "threshold": 0.9,
        "reached": [None, {"seconds": 10.0, "steps": 4096, "updates": 4}],
        "curves": [[{"updates": 8, "seconds": 80.0, "mean_reward": 0.5}], []],
    }
    table = threshold_markdown(result)
    assert "| thalamus | not reached in 8 updates (last eval 0.50) | > 80 | |" in table
    assert "| ppo | 4096 | 10 | 1.00x |" in table


def test_a_cell_from_a_folder_that_is_no_checkout_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a thalamus_rl checkout"):
        Worker(Cell(env="MiniGrid-DoorKey-5x5-v0", agent="ppo", repo=tmp_path))


@pytest.mark.slow
def test_measure_fps_trains_each_cell_in_turn() -> None:
    cells = [
        Cell(
            env="MiniGrid-DoorKey-5x5-v0",
            agent="ppo",
            overrides=("ppo.n_steps=16", "ppo.batch_size=64"),
        ),
        Cell(env="MiniGrid-DoorKey-5x5-v0", agent="ppo", label="ppo-again"),
    ]
    logged: list[str] = []
    result = measure_fps(cells, rounds=2, updates=1, log=logged.append)
    assert [c["name"] for c in result["cells"]] == ["ppo", "ppo-again"]
    assert [[r["steps"] for r in row] for row in result["rounds"]] == [[128, 1024]] * 2
    # Round 2 starts with the second cell (the order rotates).
    assert "ppo-again" in logged[2] and "ppo-again" not in logged[3]


@pytest.mark.slow
def test_a_failing_worker_names_its_cell() -> None:
    with pytest.raises(RuntimeError, match="cell 'ppo'.*ConfigError|cell 'ppo'.*not_a_key"):
        Worker(Cell(env="MiniGrid-DoorKey-5x5-v0", agent="ppo", overrides=("ppo.not_a_key=1",)))


def test_split_overrides_keeps_flow_style_values_whole() -> None:
    # A stream list's commas belong to the value: a plain split(",") cut it into pieces.
    text = "thalamus.streams=[{name: visual}, {name: semantic, clock: 4}],ppo.n_epochs=4"
    assert split_overrides(text) == (
        "thalamus.streams=[{name: visual}, {name: semantic, clock: 4}]",
        "ppo.n_epochs=4",
    )
    assert split_overrides("a=1, b='x,y'") == ("a=1", "b='x,y'")


@pytest.mark.parametrize("text", ["a=[1, 2", "a=1]", "b='x"])
def test_split_overrides_rejects_unbalanced_text(text: str) -> None:
    with pytest.raises(ValueError, match="bracket|closes nothing"):
        split_overrides(text)
