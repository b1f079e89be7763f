"""The grid (benchmarks/grid.py, launch.py): what each task resumes, bad input, the Slurm array script, and a small
local grid, run to its end and stopped by a signal. The array on a real Slurm: tests/test_slurm.py."""

import contextlib
import csv
import os
import re
import signal
import subprocess
import sys

import grid
import launch
import pytest
import torch
from helpers import ROOT, SMALL, bench, bench_command, read_text, start_bench, wait_until


def test_slurm_time_limits_in_seconds():
    forms = {"90": 5400, "10:30": 630, "4:00:00": 14400, "1-0": 86400, "1-2:30": 95400, "2-0:0:5": 172805}
    assert {form: launch.slurm_seconds(form) for form in forms} == forms
    assert [launch.slurm_seconds(form) for form in ("", "soon", "1:2:3:4", "-5", "1.5")] == [None] * 5


@pytest.mark.slow  # a subprocess
def test_slurm_dry_run_prints_a_valid_array_script(tmp_path):
    out = ROOT / "runs" / "dry"  # inside the repository: named relative to it
    result = bench("--slurm", "--dry-run", "--out", str(out), "--", "--total-timesteps", "5000")
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    assert "#SBATCH --array=0-17" in script and "#SBATCH --requeue" in script  # 6 tasks x 3 seeds
    assert "#SBATCH --open-mode=append" in script  # a requeued task's Slurm log keeps the first attempt
    assert f"#SBATCH --chdir={ROOT}\n" in script and "#SBATCH --output=runs/dry/slurm-%A_%a.log" in script
    assert "#SBATCH --time" not in script and "#SBATCH --signal" not in script and "#SBATCH --gres" not in script
    tasks = script.split("TASKS=(\n")[1].split("\n)")[0].splitlines()
    assert len(tasks) == 18 and sum("hopper-hop" in t for t in tasks) == 3
    assert tasks[0] == "'runs/dry qsm_continuous.py cheetah-run 1 --total-timesteps 5000'"
    assert sys.executable not in script and "--resume" not in script  # the launcher's
    assert not out.exists()  # a dry run writes nothing

    # a time limit, with USR1 two minutes ahead (at most half the limit); a GPU request for --cuda runs; an OUT
    # outside the repository by its absolute path
    for time_limit, lead in (("4:00:00", 120), ("3", 90), ("1-0", 120)):
        result = bench(
            "--slurm",
            "--dry-run",
            "--env-ids",
            "cheetah-run",
            "--seeds",
            "1",
            "--time",
            time_limit,
            "--out",
            str(tmp_path),
            "--",
            "--cuda",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"#SBATCH --time={time_limit}\n#SBATCH --signal=B:USR1@{lead}\n" in result.stdout
        assert (
            "#SBATCH --gres=gpu:1\n" in result.stdout
            and f"'{tmp_path} qsm_continuous.py cheetah-run 1 --cuda'" in result.stdout
        )


def fake_checkpointed_run(out, flags, seed=1, copy=ROOT / "qsm_continuous.py", name="qsm_continuous"):
    """A run directory as the script leaves it, without the training: its copy of the script, a checkpoint's args."""
    import tyro

    sys.path.insert(0, str(ROOT))
    import qsm_continuous as qsm

    args = tyro.cli(qsm.Args, args=[*flags, "--env-id", "cartpole-balance", "--seed", str(seed)])
    run_dir = out / "runs" / f"cartpole-balance__{name}__{seed}__1700000000"
    run_dir.mkdir(parents=True)
    (run_dir / copy.name).write_bytes(copy.read_bytes())
    torch.save({"args": vars(args), "global_step": 100}, run_dir / "checkpoint.pt")
    return run_dir


@pytest.mark.slow  # a subprocess
def test_dry_run_resumes_only_the_same_experiment(tmp_path):
    fake_checkpointed_run(tmp_path, ["--total-timesteps", "400"], seed=2)  # --total-timesteps may change
    result = bench(
        "--dry-run",
        "--env-ids",
        "cartpole-balance",
        "--seeds",
        "1",
        "2",
        "--out",
        str(tmp_path),
        "--",
        "--total-timesteps",
        "900",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = result.stdout.splitlines()
    assert "--seed 1" in first and "--resume" not in first
    assert "--seed 2 --resume runs/cartpole-balance__qsm_continuous__2__1700000000 --total-timesteps 900" in second


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    ("flags", "copy", "difference"),
    [
        (["--M-q", "10"], "qsm_continuous.py", "(--M-q 10.0 there, 50.0 here)"),
        ([], "README.md", "(made by another qsm_continuous.py than "),  # a run of an edited copy of the file
    ],
)
def test_a_grid_refuses_a_directory_holding_another_experiment(tmp_path, flags, copy, difference):
    run_dir = fake_checkpointed_run(tmp_path, flags, copy=ROOT / copy)
    if copy != "qsm_continuous.py":
        (run_dir / copy).rename(run_dir / "qsm_continuous.py")  # a file of that name, with other text
    for mode in ([], ["--slurm"]):
        result = bench("--env-ids", "cartpole-balance", "--seeds", "1", "--out", str(tmp_path), *mode)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {run_dir} is another experiment {difference}")
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run_dir.name]  # nothing started
        assert not (tmp_path / "qsm_array.sbatch").exists()  # nothing submitted


@pytest.mark.slow  # a subprocess
def test_variants_each_get_their_own_grid_directory(tmp_path):
    result = bench(
        "--dry-run",
        "--env-ids",
        "cartpole-balance",
        "--seeds",
        "1",
        "--out",
        str(tmp_path),
        "--variants",
        "paper",
        "small=--M-q 10",
        "--",
        "--total-timesteps",
        "900",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out, script = os.path.relpath(tmp_path), ROOT / "qsm_continuous.py"  # OUT from here, the script absolute
    assert result.stdout.splitlines() == [
        f"(mkdir -p {out}/paper && cd {out}/paper && python {script} --env-id cartpole-balance --seed 1 "
        "--total-timesteps 900)",
        f"(mkdir -p {out}/small && cd {out}/small && python {script} --env-id cartpole-balance --seed 1 --M-q 10 "
        "--total-timesteps 900)",
    ]
    first = result.stdout.splitlines()[0].replace("--total-timesteps 900", "--help")  # pasted here, it runs
    assert (
        subprocess.run(["bash", "-c", first], capture_output=True, timeout=120, env=bench_command()[1]).returncode == 0
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--env-ids", "cheetah_run"],
            "error: --env-ids 'cheetah_run' is neither a dm_control task nor a Gymnasium MuJoCo task; "
            "did you mean 'cheetah-run'?",
        ),
        (["--workers", "0"], "error: --workers must be >= 1, got 0"),
        (["--", "--seed", "3"], "error: --seed in a run's flags is set by benchmark.sh itself; use --env-ids"),
        (["--variants", "a", "a=--M-q 1"], "error: --variants 'a=--M-q 1': each needs its own NAME of letters"),
        (["--variants", "x=nowhere.py"], "error: --variants 'x=nowhere.py': no such script "),
        (["--time", "10"], "error: --time is a Slurm time limit: use it with --slurm"),
        (["--slurm", "--time", "soon"], "error: --time soon: not a Slurm time limit; use minutes, HH:MM:SS"),
        (["--", "--M-q", "many"], "error: --M-q many --dry-run: not flags of"),  # bench adds --dry-run
    ],
)
def test_bad_grid_input_is_one_line(args, expected, capsys):
    """grid.main in this process: one line on stderr and exit 2, as the script's bad input."""
    with pytest.raises(SystemExit) as exit_:
        grid.main([*args, "--dry-run"])
    message = capsys.readouterr().err
    assert exit_.value.code == 2 and message.startswith(expected) and message.count("\n") == 1, message


@pytest.mark.slow  # a subprocess
def test_bad_grid_input_exits_2_in_one_line():
    result = bench("--env-ids", "cheetah_run", "--dry-run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(
        "error: --env-ids 'cheetah_run' is neither a dm_control task nor a Gymnasium MuJoCo task; "
        "did you mean 'cheetah-run'?"
    )


@pytest.mark.slow  # a subprocess
def test_local_grid_runs_seeds_in_parallel_and_summarises(tmp_path):
    flags = ["--total-timesteps", "600", "--learning-starts", "500", "--eval-interval", "300", "--eval-episodes", "1"]
    flags += ["--critic-hidden-dims", "64", "64", "--actor-hidden-dims", "64", "64"]
    result = bench(
        "--env-ids", "cartpole-balance", "--seeds", "1", "2", "--workers", "2", "--out", str(tmp_path), "--", *flags
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 runs, 2 at a time, 1 core(s) and " in result.stdout  # and the threads: the user's or one per core
    logs = sorted(p.name for p in (tmp_path / "runs").glob("*.log"))
    assert logs == ["cartpole-balance__seed1.log", "cartpole-balance__seed2.log"]
    first = (tmp_path / "runs" / logs[0]).read_text().splitlines()[0]  # paths relative to the repository
    assert first.startswith("$ python qsm_continuous.py --env-id cartpole-balance --seed 1 --total-timesteps 600")
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 2
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 1 and rows[0]["seeds"] == "1 2" and rows[0]["steps"] == "600"
    assert (tmp_path / "results.md").exists() and (tmp_path / "curves.png").exists()


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize("signum, group", [(signal.SIGTERM, False), (signal.SIGINT, True)])  # kill GRID; Ctrl-C
def test_a_signal_to_the_grid_checkpoints_its_runs_and_starts_no_more(tmp_path, signum, group):
    flags = ["--total-timesteps", "100000", "--learning-starts", "500", "--checkpoint-interval", "500", *SMALL]
    proc = start_bench(
        "--env-ids", "cartpole-balance", "--seeds", "1", "2", "--workers", "1", "--out", str(tmp_path), "--", *flags
    )
    runs = tmp_path / "runs"
    checkpoint = wait_until(lambda: next(runs.glob("*/checkpoint.pt"), None), 120, "the first checkpoint", proc)
    pid = int((checkpoint.parent / "run.lock").read_text().split()[-3])  # "pid N on HOST"
    (os.killpg if group else os.kill)(proc.pid, signum)
    try:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum, stderr[-2000:]  # not killed by it (-signum), not a traceback (1)
        with pytest.raises(ProcessLookupError):  # the run had ended before the grid did (the old grid left it running)
            os.kill(pid, 0)
        said = f"{signum.name}: the grid stopped (1 runs not started); run the same command again to resume it\n"
        assert stderr == said  # one line, no traceback
        assert "cartpole-balance seed 1: stopped by a signal; run the same command again" in stdout
        log = (runs / "cartpole-balance__seed1.log").read_text()
        step = int(re.search(r"SIGTERM at step (\d+): checkpoint written", log)[1])  # one signal, passed on by the grid
        assert torch.load(checkpoint, weights_only=True)["global_step"] == step < 100000
        assert not (runs / "cartpole-balance__seed2.log").exists()  # never started
    finally:  # a failed case leaves nothing running
        proc.kill()  # (a no-op once it has ended)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_the_pool_reports_each_task_by_its_status(tmp_path, monkeypatch, capsys):
    """0: done; 128 + SIGTERM or SIGINT (a run stopped after a checkpoint) or killed by one: stopped, to resume, and
    counted as not done; anything else: failed."""
    task = launch.Task(str(tmp_path), str(ROOT / "qsm_continuous.py"), "cartpole-balance", 1, ())

    def ending(status):  # the launched task, ending with this status
        class Run:
            def __init__(self, cmd, **kwargs):
                assert cmd[2:] == ["run", *launch.task_argv(task)]
                self.returncode = status

            def poll(self):
                return self.returncode

        return Run

    for status, failed, said in [
        (0, 0, "done in"),
        (143, 1, "stopped by a signal; run the same command again"),
        (130, 1, "stopped by a signal"),
        (-15, 1, "stopped by a signal"),
        (1, 1, f"FAILED (status 1, see {launch.log_path(task)})"),
    ]:
        monkeypatch.setattr(launch.subprocess, "Popen", ending(status))
        assert launch.run_local([task], workers=1) == failed
        assert f"cartpole-balance seed 1: {said}" in capsys.readouterr().out


def test_the_refusal_names_the_script_that_made_the_run_and_the_one_asked_for(tmp_path):
    """A study's copy (qsm_timeweight.py) meeting a run of qsm_continuous.py for its task: the line names both
    scripts; before, it named the copy twice ("made by another qsm_timeweight.py than qsm_timeweight.py")."""
    fake_checkpointed_run(tmp_path, [])
    copy = tmp_path / "qsm_timeweight.py"
    copy.write_text((ROOT / "qsm_continuous.py").read_text() + "\n# an ablation\n")
    problem = launch.conflicts([launch.Task(str(tmp_path), str(copy), "cartpole-balance", 1, ())])
    assert f"made by qsm_continuous.py there, {os.path.relpath(copy)} here" in problem, problem


@pytest.mark.slow  # subprocesses
def test_a_local_grid_gives_each_run_the_threads_the_user_set(tmp_path):
    """OMP_NUM_THREADS=1 with one worker on this machine's cores: the run gets one torch thread (its `machine` text
    says so) and the grid's first line says where the number comes from; before, the grid gave it one per core."""
    command, env = bench_command(
        "--env-ids",
        "cartpole-balance",
        "--seeds",
        "1",
        "--workers",
        "1",
        "--out",
        str(tmp_path),
        "--",
        "--total-timesteps",
        "300",
        "--learning-starts",
        "200",
        "--eval-interval",
        "300",
        "--eval-episodes",
        "1",
        *SMALL,
    )
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("1 runs, 1 at a time, ") and "1 thread(s) each (OMP_NUM_THREADS)" in result.stdout
    (run_dir,) = (p for p in (tmp_path / "runs").glob("cartpole-balance__*") if p.is_dir())
    machine = read_text(run_dir, "machine")
    assert machine.endswith(", 1 torch threads"), machine
