"""scripts/benchmark_kernels.py: its checks on the pure path (the kernel path needs a GPU)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_kernels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pure_float32_path_is_close_to_float64_in_every_quantity(bench):
    cpu = torch.device("cpu")
    block = bench.check_block(["pure"], cpu, batch=3, length=40, chunk_size=16, reset_p=0.3)
    core = bench.check_core(["pure"], cpu, batch=2, length=20)
    names = [name for name, _ in block["pure"]]
    # Output, both halves of the final state, the input's and every parameter's gradient.
    assert names[:4] == ["y", "state.ssm", "state.conv", "grad x"]
    assert "grad A_log" in names and "grad conv1d.weight" in names
    for name, err in block["pure"] + core["pure"]:
        assert err < 1e-5, (name, err)


def test_relative_error_sees_a_wrong_result_and_nan(bench):
    ref = torch.randn(100, dtype=torch.float64)
    assert bench.relative_error(ref.float(), ref) < 1e-6
    assert bench.relative_error(ref + 0.1 * ref.norm() / 10, ref) > 1e-3
    wrong = ref.clone()
    wrong[3] = float("nan")
    assert not bench.relative_error(wrong, ref) < 1e-2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_asking_for_the_kernel_path_without_it_says_what_to_do(bench, capsys):
    assert bench.main(["--backends", "pure,kernel", "--skip-timing"]) == 2
    assert "pip install -e .[cuda]" in capsys.readouterr().err


def test_bad_sizes_say_the_format(bench):
    with pytest.raises(SystemExit, match="BxT pairs"):
        bench.parse_sizes("16by128")
    assert bench.parse_sizes("16x128,4x8") == [(16, 128), (4, 8)]
