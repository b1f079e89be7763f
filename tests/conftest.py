"""Fixtures shared by the test modules (helpers.py holds the plain functions). The repository, benchmarks/ and tests/
are on the path (pyproject.toml's pythonpath)."""

import os

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")  # before anything imports dm_control: no display probe


@pytest.fixture(scope="session")
def qsm():
    import qsm_continuous

    return qsm_continuous
