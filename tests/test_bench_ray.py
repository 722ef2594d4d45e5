"""Suites on Ray (agents/bench/runner.py): a local Ray with 2 CPUs, one per test module; a
run that crashes or whose worker dies fails alone; a second call skips finished runs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.bench import records as bench_records
from agents.bench import runner
from agents.bench import suite as bench_suite
from tests.test_benchmark import valid_text, write_suite


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    with runner.ray_session(cpus=2):
        yield


def test_a_worker_that_dies_fails_its_own_run_only() -> None:
    """One worker killed (no result, no exception) must not stop or fail the runs beside and
    after it, as a ``ProcessPoolExecutor`` would (it terminates every worker once one dies)."""
    from tests.pool_targets import die_or_finish

    jobs = [
        ("killed", ("killed", 0.2, True)),
        ("beside", ("beside", 1.0, False)),
        ("fails", ("fails", 0.0, False)),
        ("after", ("after", 0.0, False)),
    ]
    results: dict[str, str | None] = {}
    runner.run_on_ray(jobs, results.__setitem__, target=die_or_finish, log=lambda s: None)
    assert results.keys() == {"killed", "beside", "fails", "after"}
    assert results["killed"].startswith("worker died")
    assert results["beside"] is None and results["after"] is None
    assert results["fails"] == "ValueError: bad run"


def test_a_tiny_suite_on_ray_fails_the_broken_run_alone_and_skips_finished_ones(
    tmp_path: Path,
) -> None:
    out, runs = tmp_path / "out", tmp_path / "runs"
    text = valid_text(out, budget=256).replace("seeds: [0]", "seeds: [0, 1]")
    # A third row whose env rejects a keyword: it fails when its worker builds the env.
    text += (
        "  - {task: MiniGrid-Empty-5x5-v0, agents: [ppo], label: broken, seeds: [0], "
        "budget: 256, overrides: [env.env_kwargs.no_such_keyword=1]}\n"
    )
    suite = bench_suite.load_suite(write_suite(tmp_path, text))
    lines: list[str] = []
    results = runner.run_suite(suite, out, runs, cpus=2, log=lines.append)
    ok = [r.key for r in suite.runs if r.label == "ppo"]
    assert {k: results[k] for k in ok} == dict.fromkeys(ok)
    assert "no_such_keyword" in results["MiniGrid-Empty-5x5-v0__broken__0"]
    for run in suite.runs[:2]:
        record = bench_records.load_record(bench_records.record_path(out, run))
        assert record["timesteps"] == 256 and record["seed"] == run.seed
        assert record["sessions"] == 1
    assert "on Ray" in lines[0]

    # Again: the finished runs are skipped, only the broken one is tried.
    again = runner.run_suite(suite, out, runs, cpus=2, log=lambda s: None)
    assert list(again) == ["MiniGrid-Empty-5x5-v0__broken__0"]
    first = json.loads(bench_records.record_path(out, suite.runs[0]).read_text())
    assert first["curve"][-1]["timesteps"] == 256


def test_a_cluster_needs_a_storage_path_every_node_reaches(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_benchmark import benchmark_script

    suite = str(write_suite(tmp_path, valid_text(tmp_path / "out")))
    assert benchmark_script.main([suite, "--address", "head:6379"]) == 2
    assert "give --storage PATH" in capsys.readouterr().err
    assert benchmark_script.main([suite, "--storage", "relative/path"]) == 2
    assert "must be an absolute path" in capsys.readouterr().err
    storage = tmp_path / "shared"
    assert benchmark_script.main([suite, "--storage", str(storage), "--list"]) == 0
    assert "pending" in capsys.readouterr().out
