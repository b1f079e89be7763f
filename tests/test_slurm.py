"""The grid on a real one-node Slurm (benchmarks/slurm_local.sh): an array of two variants, one task requeued mid-run,
every attempt's log kept, and another variant refused in a grid directory it does not own. Marked `slurm`: the README's
test command leaves it out; `.ci/run` installs Slurm and runs `python -m pytest -m slurm`. Needs root."""

import os
import shutil
import subprocess
import time

import pytest
import torch
from test_benchmark import ROOT, bench

pytestmark = pytest.mark.slurm
FLAGS = ["--total-timesteps", "3000", "--learning-starts", "300", "--eval-interval", "500", "--eval-episodes", "1"]
FLAGS += ["--critic-hidden-dims", "16", "--actor-hidden-dims", "16", "--checkpoint-interval", "500"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("slurmctld"):
        pytest.skip("needs root and Debian's slurm-wlm and munge (.ci/run installs them)")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(ROOT / "benchmarks/slurm_local.sh"), "start", str(state)], capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert start.returncode == 0, start.stderr
    env = {"SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(ROOT / "benchmarks/slurm_local.sh"), "stop", str(state)])


def slurm(*args, env):
    return subprocess.run(args, capture_output=True, text=True, env={**os.environ, **env}, timeout=60).stdout.strip()


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"{what}: not within {timeout} s")


def test_an_array_of_two_variants_survives_a_requeue_and_keeps_every_log_line(cluster, tmp_path, monkeypatch):
    for key, value in cluster.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "study"
    submit = bench("--env-ids", "cartpole-balance", "--seeds", "1", "--variants", "a", "b=--M-q 10", "--slurm",
                   "--cpus-per-task", "1", "--out", str(out), "--", *FLAGS)  # fmt: skip
    assert submit.returncode == 0, submit.stderr
    job = slurm("squeue", "-h", "-o", "%F", env=cluster).splitlines()[0]
    wait_for(lambda: list((out / "a" / "runs").glob("*/checkpoint.pt")), 180, "variant a's first checkpoint")
    assert slurm("scontrol", "requeue", f"{job}_0", env=cluster) == ""
    wait_for(lambda: "PENDING" in slurm("squeue", "-h", "-o", "%T", "-j", f"{job}_0", env=cluster), 60, "requeued")
    slurm("scontrol", "update", f"JobId={job}_0", "StartTime=now", env=cluster)  # Slurm holds a requeue ~2 minutes
    wait_for(lambda: not slurm("squeue", "-h", "-j", job, env=cluster), 300, "both tasks finished")

    for variant, m_q in (("a", 50.0), ("b", 10.0)):
        (run_dir,) = [p for p in (out / variant / "runs").iterdir() if p.is_dir()]  # its own run, one directory
        state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        assert state["global_step"] == 3000 and state["args"]["M_q"] == m_q
    log = (out / "a" / "runs" / "cartpole-balance__seed1.log").read_text()
    assert log.count("$ python qsm_continuous.py --env-id cartpole-balance --seed 1") == 2  # both attempts kept
    assert "SIGTERM at step" in log and log.count("resumed runs/cartpole-balance__qsm_continuous__1__") == 1
    assert log.splitlines()[-1].startswith("step 3000: eval return")

    # a second grid into variant a's directory with other flags: one line, and nothing submitted
    again = bench("--env-ids", "cartpole-balance", "--seeds", "1", "--slurm", "--out", str(out / "a"), "--", *FLAGS,
                  "--M-q", "10")  # fmt: skip
    assert again.returncode == 1 and again.stderr.count("\n") == 1
    assert "is another experiment (--M-q 50.0 there, 10.0 here)" in again.stderr
    assert not slurm("squeue", "-h", env=cluster) and not (out / "a" / "qsm_array.sbatch").exists()
