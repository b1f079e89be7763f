"""Never lose a run: exact resume, crash-safe checkpoints, signals, the NaN guard and offline tracking."""

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_script import SCRIPT, SMALL, only_run_dir, read_scalars, run_script

BASE = ["--env-id", "cartpole-swingup", "--learning-starts", "400", "--eval-interval", "600", "--eval-episodes", "1"]
BASE += SMALL


def logged(run_dir):
    """Every scalar the run logged, wall-clock rates aside."""
    return {tag: values for tag, values in read_scalars(run_dir).items() if tag != "charts/SPS"}


def start_script(args, cwd):
    env = {**os.environ, "MUJOCO_GL": "disable", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def wait_for_file(cwd, pattern, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = list(cwd.glob(pattern))
        if found:
            return found[0]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no {pattern} after {timeout} s")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The reference: 1,200 steps in one go."""
    cwd = tmp_path_factory.mktemp("straight")
    result = run_script([*BASE, "--total-timesteps", "1200"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return logged(only_run_dir(cwd))


@pytest.mark.parametrize("first_total", [700, 600])  # 600: the checkpoint falls on an evaluation step
def test_resume_with_raised_total_timesteps_is_bit_exact(straight, tmp_path, first_total):
    first = run_script([*BASE, "--total-timesteps", str(first_total), "--checkpoint-interval", "500"], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    resumed = run_script(["--resume", str(run_dir), "--total-timesteps", "1200"], tmp_path)  # flags from the checkpoint
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run_dir} at step {first_total}" in resumed.stderr
    assert "note:" not in resumed.stderr  # nothing changed but the length
    assert len(straight["losses/qf1_loss"]) == 8 and [s for s, _ in straight["eval/episodic_return"]] == [600, 1200]
    assert logged(run_dir) == straight  # every logged value, bit for bit


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_writes_a_checkpoint_exits_cleanly_and_resumes_exactly(straight, tmp_path, signum):
    proc = start_script([*BASE, "--total-timesteps", "1200", "--checkpoint-interval", "500"], tmp_path)
    wait_for_file(tmp_path, "runs/*/checkpoint/state.pt", proc)  # step 500: in the learning phase
    time.sleep(0.5)  # then at an arbitrary step
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    stopped_at = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)["global_step"]
    assert 500 <= stopped_at < 1200
    relative = run_dir.relative_to(tmp_path)
    assert f"{signal.Signals(signum).name} at step {stopped_at}: checkpoint written to {relative}/checkpoint" in stderr
    assert stderr.rstrip().endswith(f"qsm_continuous.py --resume {relative}")
    resumed = run_script(["--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert logged(run_dir) == straight


def test_kill_9_leaves_a_loadable_checkpoint(tmp_path):
    proc = start_script([*BASE, "--total-timesteps", "5000", "--checkpoint-interval", "20"], tmp_path)
    wait_for_file(tmp_path, "runs/*/checkpoint/state.pt", proc)
    time.sleep(3.0)  # checkpoints every 20 steps: the kill lands at an arbitrary point, maybe inside a write
    proc.kill()
    proc.communicate()
    run_dir = only_run_dir(tmp_path)
    state = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    for name in state["buffer"]["chunks"].values():
        rows = torch.load(run_dir / "checkpoint" / name, weights_only=True)
        assert torch.isfinite(rows).all()
    step = state["global_step"]
    resumed = run_script(["--resume", str(run_dir), "--total-timesteps", str(step + 100)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {step}" in resumed.stderr


def test_planted_nan_stops_the_run_naming_step_quantity_and_checkpoint(tmp_path):
    # M_q = 1e39 overflows float32: the score target, and the actor loss with it, is infinite from the first update
    result = run_script([*BASE, "--total-timesteps", "1000", "--checkpoint-interval", "200", "--M-q", "1e39"], tmp_path)
    assert result.returncode == 2
    run_dir = only_run_dir(tmp_path).relative_to(tmp_path)
    assert result.stderr.startswith("error: non-finite losses/actor_loss (inf)")
    assert f"by step 400; the last good checkpoint is {run_dir}/checkpoint (step 400)" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    state = torch.load(tmp_path / run_dir / "checkpoint" / "state.pt", weights_only=True)
    assert state["global_step"] == 400  # no checkpoint was written after the NaN
    assert all(torch.isfinite(p).all() for p in state["critic"].values())


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("checkpointed")
    result = run_script([*BASE, "--total-timesteps", "450"], cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(cwd)


def _snapshot(directory):
    return {path: (path.stat().st_size, path.stat().st_mtime_ns) for path in directory.rglob("*")}


@pytest.mark.parametrize(
    ("damage", "args", "expected"),
    [
        ("truncate", [], "state.pt is truncated or corrupt (RuntimeError); resume from another checkpoint"),
        ("drop-chunk", [], "buffer-00000-450.pt, part of the checkpoint, is missing"),
        (
            None,
            ["--env-id", "walker-walk"],
            "was trained with --env-id cartpole-swingup, this run asks for walker-walk",
        ),
        (
            None,
            ["--critic-hidden-dims", "32", "32"],
            "was trained with --critic-hidden-dims 64 64, this run asks for 32",
        ),
        (None, ["--total-timesteps", "300"], "the checkpoint is at step 450, past --total-timesteps 300"),
    ],
)
def test_bad_checkpoints_give_one_line_and_touch_nothing(checkpointed, tmp_path, damage, args, expected):
    run_dir = checkpointed
    copy = tmp_path / run_dir.name
    shutil.copytree(run_dir, copy)
    if damage == "truncate":
        state = copy / "checkpoint" / "state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "drop-chunk":
        (copy / "checkpoint" / "buffer-00000-450.pt").unlink()
    before = _snapshot(copy)
    result = run_script(["--resume", str(copy), *args], tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.startswith("error: --resume") and expected in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert _snapshot(copy) == before  # nothing written, nothing overwritten


def test_resume_from_nowhere(tmp_path):
    result = run_script(["--resume", str(tmp_path / "nothing")], tmp_path, timeout=120)
    assert result.returncode == 2 and "no checkpoint there" in result.stderr and result.stderr.count("\n") == 1


def test_checkpoint_rewrites_only_changed_chunks_and_restores_the_ring(qsm, tmp_path, monkeypatch):
    monkeypatch.setattr(qsm.Checkpoint, "CHUNK_ROWS", 4)
    rb = qsm.ReplayBuffer(capacity=10, obs_dim=2, action_dim=1)  # chunks: rows 0-3, 4-7, 8-9
    checkpoint = qsm.Checkpoint(str(tmp_path))

    def add(n):
        for _ in range(n):
            i = float(rb.added)
            rb.add(np.full(2, i, np.float32), np.full(1, i, np.float32), i, np.full(2, i + 1, np.float32), 1.0)

    def files():
        return sorted(p.name for p in tmp_path.iterdir())

    add(6)
    checkpoint.save({"global_step": 6}, rb, step=6)
    assert files() == ["buffer-00000-6.pt", "buffer-00001-6.pt", "state.pt"]
    add(2)  # rows 6, 7: chunk 1 only
    checkpoint.save({"global_step": 8}, rb, step=8)
    assert files() == ["buffer-00000-6.pt", "buffer-00001-8.pt", "state.pt"]  # the old chunk-1 file is gone
    add(5)  # rows 8, 9, then around the ring: 0, 1, 2
    checkpoint.save({"global_step": 13}, rb, step=13)
    assert files() == ["buffer-00000-13.pt", "buffer-00001-8.pt", "buffer-00002-13.pt", "state.pt"]

    restored = qsm.ReplayBuffer(capacity=10, obs_dim=2, action_dim=1)
    loader = qsm.Checkpoint(str(tmp_path))
    loader.load_buffer(loader.load_state()["buffer"], restored)
    assert (restored.added, restored.pos, restored.size) == (13, 3, 10)
    assert torch.equal(restored.rows, rb.rows)
    assert restored.rewards.tolist() == [10, 11, 12, 3, 4, 5, 6, 7, 8, 9]


def test_track_without_network_falls_back_to_offline(tmp_path):
    env = {"WANDB_BASE_URL": "http://127.0.0.1:9", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    old = {key: os.environ.get(key) for key in [*env, "WANDB_MODE", "WANDB_API_KEY"]}
    os.environ.update(env)
    os.environ.pop("WANDB_MODE", None), os.environ.pop("WANDB_API_KEY", None)
    try:
        result = run_script([*BASE, "--total-timesteps", "450", "--track"], tmp_path, timeout=300)
    finally:
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wandb: no network; logging offline to ./wandb (upload later: wandb sync --sync-all)" in result.stderr
    assert list((tmp_path / "wandb").glob("offline-run-*"))
