"""The grid on a real one-node Slurm (benchmarks/slurm_local.sh): an array of two variants, one task requeued mid-run,
every attempt's log kept, each variant's flags in the study's summary, another variant refused in a grid directory it
does not own; a time limit that requeues its task until the run reaches its last step; a SIGTERM without a requeue that
ends the task as FAILED, not COMPLETED; a Python that cannot run the tasks named in one line. Marked `slurm`: the
README's test command leaves it out; `.ci/run` installs Slurm and runs `python -m pytest -m slurm`. Needs root."""

import os
import re
import shutil
import subprocess

import pytest
import torch
from helpers import ROOT, bench, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
SMALL = ["--learning-starts", "300", "--eval-episodes", "1", "--critic-hidden-dims", "16", "--actor-hidden-dims", "16"]
FLAGS = ["--total-timesteps", "3000", "--eval-interval", "500", "--checkpoint-interval", "500", *SMALL]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("slurmctld"):
        pytest.skip("needs root and Debian's slurm-wlm and munge (.ci/run installs them)")
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(
        ["bash", str(ROOT / "benchmarks/slurm_local.sh"), "start", str(state)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert start.returncode == 0, start.stderr
    env = {"SLURM_CONF": str(state / "slurm.conf")}
    yield env
    subprocess.run(["bash", str(ROOT / "benchmarks/slurm_local.sh"), "stop", str(state)])


@pytest.fixture
def on_cluster(cluster, monkeypatch):
    for key, value in cluster.items():
        monkeypatch.setenv(key, value)


def slurm(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=60).stdout.strip()


def submit(out, *args):
    """bash benchmark.sh --slurm ...: the array's job id."""
    result = bench("--env-ids", "cartpole-balance", "--slurm", "--cpus-per-task", "1", "--out", str(out), *args)
    assert result.returncode == 0, result.stderr
    return re.search(r"Submitted batch job (\d+)", result.stdout)[1]


def job_state(task):
    """(state, exit code) of an array task, e.g. ("COMPLETED", "0:0"), as `scontrol show job` tells it."""
    info = slurm("scontrol", "show", "job", "-o", task)
    return re.search(r"JobState=(\S+)", info)[1], re.search(r" ExitCode=(\S+)", info)[1]


def wait_for(condition, timeout, what, release=None):
    """wait_until, releasing the tasks of job `release` that Slurm holds after a requeue (~2 minutes): each hold once,
    5 s ahead (a task started again within the second of its requeue is killed: "Job credential revoked")."""
    released = set()

    def check():
        for line in slurm("squeue", "-h", "-o", "%i %r", "-j", release).splitlines() if release else []:
            task, reason = line.split(maxsplit=1)
            if reason != "BeginTime":  # only a held task needs its restart count (one scontrol call each)
                continue
            hold = (task, re.search(r"Restarts=(\d+)", slurm("scontrol", "show", "job", "-o", task))[1])
            if hold not in released:
                slurm("scontrol", "update", f"JobId={task}", "StartTime=now+5")
                released.add(hold)
        return condition()

    wait_until(check, timeout, what, poll=1)


def done(job):
    return lambda: not slurm("squeue", "-h", "-j", job)


def only_run(runs):
    (run_dir,) = [p for p in runs.iterdir() if p.is_dir()]  # the task's own run, one directory
    return run_dir, torch.load(run_dir / "checkpoint.pt", weights_only=True)


def test_an_array_of_two_variants_survives_a_requeue_and_keeps_every_log_line(on_cluster, tmp_path):
    out = tmp_path / "study"
    job = submit(out, "--seeds", "1", "--variants", "a", "b=--M-q 10", "--", *FLAGS)
    wait_for(lambda: list((out / "a" / "runs").glob("*/checkpoint.pt")), 180, "variant a's first checkpoint")
    assert slurm("scontrol", "requeue", f"{job}_0") == ""
    wait_for(lambda: "PENDING" in slurm("squeue", "-h", "-o", "%T", "-j", f"{job}_0"), 60, "requeued")
    wait_for(done(job), 300, "both tasks finished", release=job)

    for variant, m_q in (("a", 50.0), ("b", 10.0)):
        _, state = only_run(out / variant / "runs")
        assert state["global_step"] == 3000 and state["args"]["M_q"] == m_q
    log = (out / "a" / "runs" / "cartpole-balance__seed1.log").read_text()
    assert log.count("$ python qsm_continuous.py --env-id cartpole-balance --seed 1") == 2  # both attempts kept
    assert f", Slurm task {job}_0, " in log  # where its Slurm log is: OUT/slurm-JOB_TASK.log
    # the requeue's SIGTERM reached the run and, passed on as SIGINT, through the array script: one stop, not two
    assert re.search(r"SIG(TERM|INT) at step \d+: checkpoint written", log)
    assert log.count("resumed runs/cartpole-balance__qsm_continuous__1__") == 1
    assert log.splitlines()[-1].startswith("step 3000: eval return")
    assert job_state(f"{job}_0") == ("COMPLETED", "0:0") and job_state(f"{job}_1") == ("COMPLETED", "0:0")
    assert "cartpole-balance seed 1, the run's output in " in (out / f"slurm-{job}_0.log").read_text()

    # the study's summary names each variant by the flags its runs recorded
    summary = bench("summary", str(out))
    assert summary.returncode == 0, summary.stderr[-3000:]
    flags = dict(
        re.findall(r"^\| (\w) \| [^|]* \| `(.*)` \|$", (out / "study.md").read_text(), re.M)
    )  # variant, script, flags
    assert "--learning-starts 300" in flags["a"] and "--M-q" not in flags["a"] and "--total-timesteps" not in flags["a"]
    assert flags["b"].replace(" --M-q 10.0", "") == flags["a"] != flags["b"]

    # a second grid into variant a's directory with other flags: one line, and nothing submitted
    again = bench(
        "--env-ids", "cartpole-balance", "--seeds", "1", "--slurm", "--out", str(out / "a"), "--", *FLAGS, "--M-q", "10"
    )
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "is another experiment (--M-q 50.0 there, 10.0 here)" in again.stderr
    assert not slurm("squeue", "-h") and not (out / "a" / "qsm_array.sbatch").exists()


def test_a_time_limit_requeues_the_task_until_its_run_reaches_its_last_step(on_cluster, tmp_path):
    # 2 minutes: USR1 60 s ahead, which Slurm's 30-s check sends 30-60 s after a start; 4 updates per step, so that
    # no attempt can finish in one
    steps = ["--total-timesteps", "4000", "--utd-ratio", "4", "--eval-interval", "1000", "--checkpoint-interval", "250"]
    job = submit(tmp_path, "--seeds", "1", "--time", "2", "--", *steps, *SMALL)
    # a USR1 before the run has started (--signal's may come that early): the task requeues as well
    wait_for(lambda: (tmp_path / f"slurm-{job}_0.log").exists(), 60, "the task started")
    assert slurm("scancel", "--signal=USR1", "--batch", f"{job}_0") == ""
    wait_for(done(job), 600, "the task finished", release=job)
    _, state = only_run(tmp_path / "runs")
    assert state["global_step"] == 4000
    slurm_log = (tmp_path / f"slurm-{job}_0.log").read_text()
    assert "stopped at the time limit (status 143); requeued to resume the run" in slurm_log
    assert "DUE TO TIME LIMIT" not in slurm_log  # the run stopped itself ahead of the limit
    log = (tmp_path / "runs" / "cartpole-balance__seed1.log").read_text()
    assert "SIGTERM at step" in log and "resumed runs/" in log and log.splitlines()[-1].startswith("step 4000: eval")
    assert job_state(f"{job}_0") == ("COMPLETED", "0:0")


def test_a_sigterm_without_a_requeue_ends_the_task_as_failed_with_a_checkpoint(on_cluster, tmp_path):
    """scancel --batch: SIGTERM to the array script alone (a drain), passed on to the run; --full: to the run as well
    (as a pre-emption sends it), which must not make it a second signal that stops the run before its checkpoint."""
    job = submit(
        tmp_path,
        "--seeds",
        "1",
        "2",
        "--",
        "--total-timesteps",
        "100000",
        "--checkpoint-interval",
        "500",
        "--eval-interval",
        "5000",
        *SMALL,
    )
    logs = [tmp_path / "runs" / f"cartpole-balance__seed{seed}.log" for seed in (1, 2)]
    wait_for(lambda: len(list((tmp_path / "runs").glob("*/checkpoint.pt"))) == 2, 180, "both runs' first checkpoint")
    slurm("scancel", "--signal=TERM", "--batch", f"{job}_0")
    slurm("scancel", "--signal=TERM", "--full", f"{job}_1")
    wait_for(done(job), 120, "both tasks ended")
    for seed, log, signals in ((1, logs[0], ("SIGINT",)), (2, logs[1], ("SIGTERM", "SIGINT"))):
        state, code = job_state(f"{job}_{seed - 1}")
        stop = re.search(r"(SIG\w+) at step (\d+): checkpoint written to (\S+\.pt)", log.read_text())
        assert state == "FAILED" and code == f"{128 + (2 if stop[1] == 'SIGINT' else 15)}:0", (seed, state, code)
        assert stop[1] in signals and torch.load(tmp_path / stop[3], weights_only=True)["global_step"] == int(stop[2])


def test_a_python_that_cannot_run_the_tasks_is_one_line(on_cluster, tmp_path, monkeypatch):
    monkeypatch.setenv("QSM_PYTHON", str(tmp_path / "no-python"))
    job = submit(tmp_path, "--seeds", "1", "--", *FLAGS)
    wait_for(done(job), 60, "the task ended")
    assert job_state(f"{job}_0") == ("FAILED", "2:0")
    lines = (tmp_path / f"slurm-{job}_0.log").read_text().splitlines()
    assert lines == [
        f"error: task {job}_0: {tmp_path}/no-python cannot import torch, dm_control and tyro; activate "
        "the project's venv before sbatch, or set QSM_PYTHON"
    ]
    assert not (tmp_path / "runs").exists()
