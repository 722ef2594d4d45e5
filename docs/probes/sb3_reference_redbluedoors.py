"""Issue 35's SB3 reference on RedBlueDoors-6x6: SB3's PPO on image-only observations under
``VecNormalize`` (observations and rewards), lr 2.5e-4, batch 1024, ent_coef 0.01 (the
``image_vecnorm`` encoding and ``zoo`` recipe of ``baseline_encoding_keycorridor.py``, with
that script's env id changed and an evaluation every 100k). Prints the mean eval reward (50
stochastic episodes) at each point. Numbers: ``docs/benchmarks/baselines.md``.

    .venv/bin/python docs/probes/sb3_reference_redbluedoors.py SEED STEPS
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SPEC = importlib.util.spec_from_file_location(
    "baseline_encoding_keycorridor", Path(__file__).with_name("baseline_encoding_keycorridor.py")
)
probe = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = probe
_SPEC.loader.exec_module(probe)
probe.ENV_ID = "MiniGrid-RedBlueDoors-6x6-v0"
probe.EvalEvery.__init__.__defaults__ = (100_000,)

if __name__ == "__main__":
    probe.main("image_vecnorm", "zoo", int(sys.argv[1]), int(sys.argv[2]))
