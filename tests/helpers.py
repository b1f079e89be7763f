"""What the tests share: the repository's paths, running the script and benchmark.sh as a user does, reading what a
run wrote (through benchmarks/events.py, the repository's one reader of event files), waiting for a condition, and
the copy of the file a user edits for an ablation. Imported by the test modules; fixtures live in conftest.py."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import events

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "qsm_continuous.py"
SMALL = ["--critic-hidden-dims", "64", "64", "--actor-hidden-dims", "64", "64"]
# a short cartpole-swingup run with small networks: the long-run tests' base
BASE = ["--env-id", "cartpole-swingup", "--learning-starts", "400", "--eval-interval", "600", "--eval-episodes", "1"]
BASE += SMALL
QUIET = {"MUJOCO_GL": "disable", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}  # one thread: small networks


def on_the_cpu(args):
    """The args, on the CPU unless they ask for --cuda: exact resumes are promised on the CPU only (README)."""
    return [*args] if "--cuda" in args else [*args, "--no-cuda"]


def run_script(args, cwd, timeout=900, gl="disable", script=SCRIPT, progress_bar=False):
    """The script run to its end in cwd: the CompletedProcess; progress_bar: tqdm's bar on stderr, as a user sees it."""
    env = {**os.environ, **QUIET, "MUJOCO_GL": gl}
    if progress_bar:
        del env["TQDM_DISABLE"]
    return subprocess.run(
        [sys.executable, str(script), *on_the_cpu(args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def start_script(args, cwd):
    """The script started in cwd: the Popen, to signal or kill."""
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *on_the_cpu(args)],
        cwd=cwd,
        env={**os.environ, **QUIET},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def bench_command(*args):
    """bash benchmark.sh ARGS and its environment: it runs `python`, this interpreter's, as in an activated venv."""
    env = {**os.environ, "MUJOCO_GL": "disable", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return ["bash", str(ROOT / "benchmark.sh"), *args], env


def bench(*args, timeout=600):
    """bash benchmark.sh ARGS run to its end: the CompletedProcess."""
    command, env = bench_command(*args)
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def start_bench(*args):
    """bash benchmark.sh ARGS started in a session of its own, a process group to signal as a terminal does."""
    command, env = bench_command(*args)
    return subprocess.Popen(
        command, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True
    )


def wait_until(condition, timeout, what, proc=None, poll=0.05):
    """condition()'s first true value within timeout seconds; fails naming `what`, or the process's stderr if the
    process given ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := condition():
            return found
        assert proc is None or proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s")


def wait_for_file(cwd, pattern, proc, timeout=300):
    """The first file matching pattern under cwd, written while proc runs."""
    return wait_until(lambda: next(iter(cwd.glob(pattern)), None), timeout, f"no {pattern}", proc, poll=0.02)


def only_run_dir(cwd):
    (run_dir,) = (Path(cwd) / "runs").iterdir()
    return run_dir


def read_scalars(run_dir):
    """{tag: [(step, value)]} of every scalar the run logged."""
    return events.all_scalars(events.load_run(run_dir))


def read_text(run_dir, tag):
    """The last text the run logged under tag (through benchmarks/events.py)."""
    return events.texts(events.load_run(run_dir), tag)[-1][1]


def edited_copy(directory: Path, *edits: tuple[str, str]) -> Path:
    """qsm_continuous.py copied into directory with each (old, new) edit made where old occurs, once: the file as a
    user modifies it for an ablation (its body edited in place, not subclassed)."""
    source = SCRIPT.read_text()
    for old, new in edits:
        assert source.count(old) == 1, f"the edit's anchor must occur once: {old!r}"
        source = source.replace(old, new)
    path = directory / "qsm_edited.py"
    path.write_text(source)
    return path


def import_path(path: Path):
    """A Python file imported as a module of its own (an edited copy of the script)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
