import importlib.util
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


def edited_copy(directory: Path, *edits: tuple[str, str]) -> Path:
    """qsm_continuous.py copied into directory with each (old, new) edit made where old occurs, once: the file as a
    user modifies it for an ablation (its body edited in place, not subclassed)."""
    source = (ROOT / "qsm_continuous.py").read_text()
    for old, new in edits:
        assert source.count(old) == 1, f"the edit's anchor must occur once: {old!r}"
        source = source.replace(old, new)
    path = directory / "qsm_edited.py"
    path.write_text(source)
    return path


def import_path(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
