import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MUJOCO_GL", "disable")


@pytest.fixture(scope="session")
def qsm():
    import qsm_continuous

    return qsm_continuous
