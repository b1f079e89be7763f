"""Sweeps never mix or lose runs: one directory per run, held by one process; a checkpoint that cannot be written or
does not fit the file's networks ends the run in one line."""

import errno
import os
import subprocess
import sys
import time

import pytest
import torch
from helpers import BASE, SCRIPT, edited_copy, only_run_dir, run_script, start_script, wait_for_file

pytestmark = pytest.mark.slow  # runs of the script in subprocesses

TINY = ["--env-id", "cartpole-balance", "--learning-starts", "100", "--eval-interval", "300", "--eval-episodes", "1"]
TINY += ["--critic-hidden-dims", "16", "--actor-hidden-dims", "16", "--checkpoint-interval", "200"]


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    # every name the next 60 seconds would give is taken: each run must find its own suffix, racing the others
    now = int(time.time())
    for t in range(now, now + 60):
        (tmp_path / "runs" / f"cartpole-balance__qsm_continuous__1__{t}").mkdir(parents=True)
    procs = {m: start_script([*TINY, "--total-timesteps", "300", "--M-q", str(m)], tmp_path) for m in (10, 20, 30)}
    for proc in procs.values():
        assert proc.wait(timeout=300) == 0, proc.communicate()[1][-3000:]
    made = [d for d in (tmp_path / "runs").iterdir() if any(d.iterdir())]
    assert len(made) == 3 and all("-" in d.name.rsplit("__", 1)[1] for d in made)  # each a suffixed name
    for run_dir in made:  # each holds its own run: its own flags, one event file
        state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        assert state["global_step"] == 300
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
    assert sorted(torch.load(d / "checkpoint.pt", weights_only=True)["args"]["M_q"] for d in made) == [10, 20, 30]


def test_a_live_run_is_held_and_its_resume_refused_in_one_line(tmp_path):
    live = start_script([*BASE, "--total-timesteps", "1200", "--checkpoint-interval", "500"], tmp_path)
    wait_for_file(tmp_path, "runs/*/checkpoint.pt", live)
    run_dir = only_run_dir(tmp_path)
    second = run_script(["--resume", str(run_dir)], tmp_path, timeout=300)
    assert second.returncode == 2
    assert second.stderr.count("\n") == 1 and f"{run_dir} is in use by pid {live.pid} on " in second.stderr
    assert live.wait(timeout=600) == 0, live.communicate()[1][-3000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 1200  # it finished


def test_a_failed_write_leaves_no_partial_file_and_the_last_checkpoint_whole(qsm, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    qsm.save_atomic(str(path), {"step": 1})

    def disk_full(state, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(qsm.Failure) as failure:  # the script prints it as one line `error: ...` and exits 2
        qsm.save_atomic(str(path), {"step": 2})
    message = str(failure.value)
    assert message.startswith(f"cannot write {path} (No space left on device; ") and "\n" not in message
    assert message.endswith(f" MiB free there); the last good checkpoint: {path}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]  # no checkpoint.pt.tmp
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_a_write_on_a_full_filesystem_ends_in_one_line(qsm, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root); the simulated full disk tests the same path")
    try:
        qsm.save_atomic(str(small / "checkpoint.pt"), {"step": 1})
        # torch.save's own error on ENOSPC is "unexpected pos ...": the line adds why
        with pytest.raises(qsm.Failure) as failure:
            qsm.save_atomic(str(small / "checkpoint.pt"), {"step": 2, "buffer": torch.zeros(2**20)})
        assert str(failure.value).endswith(f" 0 MiB free there); the last good checkpoint: {small}/checkpoint.pt")
        assert [p.name for p in small.iterdir()] == ["checkpoint.pt"]
        assert torch.load(small / "checkpoint.pt", weights_only=True) == {"step": 1}
    finally:
        subprocess.run(["umount", str(small)])


FULL_AT_SECOND_SAVE = """
import errno, torch
_save, _calls = torch.save, []
def save(state, f, *args, **kwargs):
    _calls.append(1)
    if len(_calls) == 2:  # the second checkpoint: the disk fills half-way through
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    return _save(state, f, *args, **kwargs)
torch.save = save
"""


def test_a_full_disk_ends_the_run_in_one_line_and_it_resumes(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FULL_AT_SECOND_SAVE)  # imported at start-up from PYTHONPATH
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "MUJOCO_GL": "disable",
        "OMP_NUM_THREADS": "1",
        "TQDM_DISABLE": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *TINY, "--total-timesteps", "600"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    run_dir = only_run_dir(tmp_path)
    relative = run_dir.relative_to(tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("error:") == 1
    assert f"error: cannot write {relative}/checkpoint.pt (No space left on device; " in proc.stderr
    assert proc.stderr.endswith(f"the last good checkpoint: {relative}/checkpoint.pt\n")
    assert not list(run_dir.glob("*.tmp"))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 200  # the first, intact
    resumed = run_script(["--resume", str(run_dir)], tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["global_step"] == 600


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("small")
    result = run_script([*TINY, "--total-timesteps", "200", "--save-model"], cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return cwd, only_run_dir(cwd)


@pytest.mark.parametrize("flag", ["--resume", "--evaluate-model"])
def test_a_checkpoint_of_another_network_ends_in_one_line(small_run, tmp_path, flag):
    # the copy's denoiser gained a hidden layer, as a user's ablation would add one
    edited = edited_copy(
        tmp_path,
        (
            "dims = (action_dim + obs_dim + 128, *hidden_dims)",
            "dims = (action_dim + obs_dim + 128, *hidden_dims, hidden_dims[-1])",
        ),
    )
    cwd, run_dir = small_run
    more = ["--total-timesteps", "400"] if flag == "--resume" else []  # the run ended at 200: something to train
    result = run_script([flag, str(run_dir), *more], cwd, timeout=300, script=edited)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {run_dir}/checkpoint.pt: its denoiser was made by another version of ")
    assert 'Missing key(s) in state_dict: "mlp.1.weight", "mlp.1.bias"' in result.stderr
