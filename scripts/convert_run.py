#!/usr/bin/env python
"""Convert a run saved as stable-baselines3 zips (older versions) to safe model files.

Examples::

    python scripts/convert_run.py runs/MiniGrid-DoorKey-5x5-v0__thalamus__0__20250101-120000 \\
        --trust-pickle
    python scripts/convert_run.py old_model.zip --config old_run/config.yaml --trust-pickle

Older versions saved ``final_model.zip``, ``best_model.zip`` and ``checkpoints/step_*.zip``
with stable-baselines3's ``save``: the zips hold pickled Python objects, and loading one runs
any code its author put in it. This project now reads only ``.safetensors`` model files
(weights and optimizer state as tensors, the config and counters as text; see
``agents/experiment/model_files.py``). This script loads each zip of a run **once, by
unpickling it** (hence ``--trust-pickle``: use it only on runs you made or trust) and writes the
``.safetensors`` file beside it, with the run's ``config.yaml`` inside, the same modification
time, and the checkpoint's JSON sidecar pointing to it. The zips are left in place (nothing
reads them any more); delete them once the converted run resumes and evaluates.

Exit codes: 0 converted (or nothing to convert), 2 refused (no ``--trust-pickle``, no config,
an unreadable zip).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from agents.experiment.config import ConfigError
from agents.experiment.model_files import MODEL_SUFFIX, TRUST_PICKLE_HELP

EXIT_REFUSED = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_run.py",
        description=(
            "Convert a run directory (or one model .zip) saved by an older version as "
            "stable-baselines3 zips into .safetensors model files that load without unpickling."
        ),
    )
    parser.add_argument("target", metavar="RUN_DIR_OR_ZIP", help="run directory or model .zip")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="the run's config.yaml (default: in the run directory, or beside the zip)",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help=f"required: {TRUST_PICKLE_HELP}",
    )
    return parser


def zips_of(target: Path) -> list[Path]:
    """The zips to convert: a run's checkpoints, best and final model (that order), or one."""
    if target.is_file():
        return [target]
    found = sorted((target / "checkpoints").glob("step_*.zip"))
    found += [target / name for name in ("best_model.zip", "final_model.zip")]
    return [path for path in found if path.is_file()]


def convert(zip_path: Path, config_path: Path) -> Path:
    """Convert one zip; return the ``.safetensors`` file written beside it.

    :raises ConfigError: the config or the zip cannot be read.
    """
    from agents.experiment.config import load_config
    from agents.experiment.model_files import attach_config, load_pickled_model, save_model

    config = load_config(config_path, ["train.device=cpu"], defaults_file=None)
    model = load_pickled_model(zip_path, config.agent.kind, device="cpu")
    attach_config(model, config)
    target = zip_path.with_suffix(MODEL_SUFFIX)
    save_model(model, target)
    stamp = zip_path.stat()
    os.utime(target, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # "newest" stays as it was
    sidecar = zip_path.with_suffix(".json")
    if zip_path.parent.name == "checkpoints" and sidecar.is_file():
        from agents.experiment.io import atomic_write_text

        meta = json.loads(sidecar.read_text())
        meta["model"] = target.name
        atomic_write_text(sidecar, json.dumps(meta))
    return target


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    target = Path(args.target)
    if not args.trust_pickle:
        print(
            f"error: converting {target} loads its stable-baselines3 zips by unpickling them, "
            "which runs any code their author put in them; pass --trust-pickle if you made "
            "this run or trust its author",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    if not target.exists():
        print(f"error: {target} does not exist", file=sys.stderr)
        return EXIT_REFUSED
    run_dir = target if target.is_dir() else target.parent
    if args.config is not None:
        config_path = Path(args.config)
    else:
        candidates = [run_dir / "config.yaml", run_dir.parent / "config.yaml"]
        config_path = next((p for p in candidates if p.is_file()), candidates[0])
    if not config_path.is_file():
        print(
            f"error: no config.yaml for {target}: a zip does not say which agent and env it "
            "was trained for; pass --config FILE",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    zips = zips_of(target)
    if not zips:
        print(f"nothing to convert: {target} holds no stable-baselines3 zip")
        return 0
    for zip_path in zips:
        try:
            written = convert(zip_path, config_path)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_REFUSED
        print(f"converted {zip_path} -> {written.name}")
    print(f"done: the .zip files are no longer read; delete them once {target} loads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
