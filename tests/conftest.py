"""Shared pytest setup."""

import pytest


@pytest.fixture(autouse=True)
def _sb3_logs_in_tmp_path(tmp_path_factory, monkeypatch):
    """Keep SB3's default logger out of the system temp dir.

    ``model.learn()`` without ``set_logger`` makes SB3 create ``$TMPDIR/SB3-<date>``;
    without this, every test run would leave about ten of them behind.
    """
    monkeypatch.setenv("SB3_LOGDIR", str(tmp_path_factory.mktemp("sb3_logs")))
