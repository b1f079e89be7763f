"""Fixtures shared by the test modules (helpers.py holds the plain functions). The repository, benchmarks/ and tests/
are on the path (pyproject.toml's pythonpath)."""

import os
import subprocess
import sys

import pytest

os.environ.setdefault("MUJOCO_GL", "disable")  # before anything imports dm_control: no display probe


@pytest.fixture(scope="session")
def qsm():
    import qsm_continuous

    return qsm_continuous


@pytest.fixture(scope="session")
def egl():
    """Skips where MuJoCo cannot render headless (EGL): probed when a test asks, not when pytest collects."""
    probe = "from dm_control import suite; suite.load('cartpole', 'swingup').physics.render(24, 32)"
    env = {**os.environ, "MUJOCO_GL": "egl"}
    if subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode != 0:
        pytest.skip("no headless OpenGL (EGL) on this machine: see README, Flags (--capture-video)")
