"""benchmark.sh: the summary of TensorBoard files, the Slurm script, and a small local grid."""

import csv
import os
import re
import signal
import subprocess
import sys

import grid
import launch
import numpy as np
import pytest
import report
import stats
import torch
from helpers import ROOT, SMALL, bench, start_bench, wait_until

PROBE_BINS = np.linspace(-1.0, 1.0, 201)  # the script's probe histogram


def fake_run(out, env_id, seed, evals, sps, probe=None, bins=PROBE_BINS, args=None):
    """A run's TensorBoard file: eval returns, SPS and, at the last evaluation, the probe samples of 2 action dims;
    given args (an Args), its arguments as the script records them."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "runs" / f"{env_id}__qsm_continuous__{seed}__1700000000"))
    if args is not None:
        rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{rows}")
    for step, value in evals:
        writer.add_scalar("eval/episodic_return", value, step)
    for i, value in enumerate(sps):
        writer.add_scalar("charts/SPS", value, 100 * (i + 1))
    probe = np.r_[np.full(700, -1.0), np.full(300, 0.5)] if probe is None else probe
    for dim in range(2):
        writer.add_histogram(f"eval/action_dim_{dim}", probe, evals[-1][0], bins=bins)
    writer.close()


class ClosedPipe:
    def write(self, text):
        raise BrokenPipeError

    def flush(self):
        pass


@pytest.mark.parametrize("study", [False, True])
def test_a_closed_pipe_cuts_no_summary_file_short(tmp_path, monkeypatch, study):
    """`bash benchmark.sh summary DIR | head`: the output stops at the pipe's end, every file is written first (the
    plots were drawn after the table's print, and lost)."""
    runs_dir = tmp_path / "paper" if study else tmp_path  # a study's variant, or a grid
    fake_run(runs_dir, "cheetah-run", 1, [(50_000, 100.0), (100_000, 300.0)], [10.0])
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    with pytest.raises(BrokenPipeError):
        (report.summarize_study if study else report.summarize)(str(tmp_path))
    written = ["study.md", "study.csv", "study_curves.png"] if study else ["results.md", "curves.csv", "curves.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in written)
    assert list(runs_dir.glob("actions_*.png"))


@pytest.mark.slow  # a subprocess
def test_summary_of_synthetic_runs(tmp_path):
    """Per task: mean ± std over seeds at the last step all seeds reached and at every evaluation, SAC's three seeds at
    the same step, the probe's share near ±1 and modes; over the tasks with 3 seeds, the IQM with its 95% CI."""
    for seed, (final, sps) in enumerate([(300.0, [10.0, 30.0]), (500.0, [20.0]), (400.0, [20.0])], start=1):
        fake_run(tmp_path, "cheetah-run", seed, [(50_000, 100.0 * seed), (100_000, final)], sps)
    for seed in (1, 2, 3):  # every seed 800: a degenerate bootstrap, the interval collapses on the point
        fake_run(tmp_path, "walker-walk", seed, [(50_000, 200.0), (100_000, 800.0)], [10.0], bins="tensorflow")
    fake_run(tmp_path, "hopper-hop", 1, [(50_000, 5.0)], [], probe=np.random.default_rng(0).normal(0.2, 0.1, 1000))
    fake_run(tmp_path / "rerun", "cheetah-run", 2, [(50_000, 150.0), (100_000, 450.0)], [])
    fake_run(tmp_path / "rerun", "walker-walk", 1, [(50_000, 200.0), (100_000, 810.0)], [])
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["env_id"]: row for row in csv.DictReader(open(tmp_path / "results.csv"))}
    cheetah = rows["cheetah-run"]
    assert float(cheetah["final_mean"]) == 400 and float(cheetah["final_std"]) == pytest.approx(81.6497, abs=1e-3)
    assert cheetah["seeds"] == "1 2 3" and cheetah["steps"] == "100000" and float(cheetah["sps"]) == 20
    assert float(cheetah["sac_mean"]) == pytest.approx((362.4 + 236.9 + 331.1) / 3)  # TD-MPC2's seeds at 100k
    assert float(cheetah["near_bounds"]) == pytest.approx(0.7) and float(cheetah["modes_mean"]) == 2  # -1 and 0.5
    assert float(rows["walker-walk"]["near_bounds"]) == pytest.approx(0.7)  # TensorBoard's default buckets too
    assert float(rows["walker-walk"]["modes_mean"]) == 2
    hopper = rows["hopper-hop"]
    assert hopper["steps"] == "50000" and hopper["sac_mean"] == "nan" and float(hopper["modes_mean"]) == 1
    table = (tmp_path / "results.md").read_text()
    assert "| cheetah-run | 1 2 3 | 100000 | 400.0 ± 81.6 | 310 ± 53 | 648 (MR.Q) | 70% | 2.00 | 100% | 20.0 |" in table
    # IQM of [0.3, 0.5, 0.4, 0.8, 0.8, 0.8]: trim 1 of 6 at each end -> mean(0.4, 0.5, 0.8, 0.8) = 0.625
    (aggregate,) = [line for line in table.splitlines() if line.startswith("Aggregate")]
    assert "over cheetah-run, walker-walk (3 seeds each)" in aggregate and "QSM 0.625 [" in aggregate
    low, high = (float(x) for x in re.search(r"QSM 0.625 \[([\d.]+), ([\d.]+)\]", aggregate).groups())
    assert 0.3 <= low < 0.625 < high <= 0.8
    sac = sorted([362.4, 236.9, 331.1, 917.8, 509.6, 697.1])[1:-1]
    assert f"SAC (3 seeds each) {sum(sac) / 4000:.3f} [" in aggregate
    assert "| cheetah-run | 200 ± 82 | 400 ± 82 |" in table  # the curve: 100, 200, 300 at 50k
    # reruns: gap to the original (mean over 50k and 100k) against the gaps between seeds (cheetah-run: 150, 150, 100)
    assert "| cheetah-run | 2 | 100000 | 450 | 500 | 50 | 100-150 | yes |" in table
    assert "| walker-walk | 1 | 100000 | 810 | 800 | 5 | 0-0 | no |" in table  # identical seeds: any gap is outside
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert [(c["env_id"], c["step"]) for c in curves][:2] == [("cheetah-run", "50000"), ("cheetah-run", "100000")]
    probes = list(csv.DictReader(open(tmp_path / "probes.csv")))
    assert len(probes) == 14 and {p["modes"] for p in probes} == {"1", "2"}
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("actions_*.png"))) == 7  # one action-distribution picture per run


def test_the_aggregate_takes_every_seed_and_names_those_it_leaves_out():
    """rliable needs as many seeds per task: five on both tasks are all used (reading three would give 0.400); five
    against four leave out the fifth, by name."""

    def runs_of(seeds_of):  # {env_id: [final return of seed 1, 2, ...]} at step 100k, as summarize holds them
        return {env: {seed: ({100_000: r}, [], [], []) for seed, r in enumerate(rs, 1)} for env, rs in seeds_of.items()}

    rows = [{"env_id": env, "steps": 100_000} for env in ("cheetah-run", "walker-walk")]
    five = report.aggregate_line(
        runs_of({"cheetah-run": [100, 200, 300, 400, 500], "walker-walk": [500, 600, 700, 800, 900]}), rows
    )
    assert "(5 seeds each): IQM of the normalised score (return / 1000) QSM 0.500 [" in five  # trim 2 of 10 per end
    assert "SAC (3 seeds each)" in five
    uneven = report.aggregate_line(
        runs_of({"cheetah-run": [100, 200, 300, 400, 900], "walker-walk": [600, 700, 800, 900]}), rows
    )
    assert "(4 seeds each; left out: cheetah-run seed 5): IQM" in uneven and "QSM 0.500 [" in uneven  # .3 .4 .6 .7


def test_the_aggregate_interval_is_reproducible():
    """The same scores give the same interval whatever numpy's global random state (rliable 1.2 draws from it)."""
    scores = [[0.362, 0.368, 0.918], [0.237, 0.356, 0.510], [0.331, 0.295, 0.697]]
    np.random.seed(1)
    first = stats.iqm_ci(scores)
    np.random.seed(2)
    assert stats.iqm_ci(scores) == first
    assert np.random.random() == np.random.RandomState(2).random()  # the caller's global state is left as it was


@pytest.mark.slow  # a subprocess
def test_a_single_seed_task_has_no_aggregate(tmp_path):
    fake_run(tmp_path, "cheetah-run", 1, [(1000, 100.0)], [])
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Aggregate: needs a task with 3 or more seeds" in (tmp_path / "results.md").read_text()


def known_modes(name, rng):
    """1,000 samples of a distribution whose modes are known, clipped to [-1, 1] as the sampler's output is."""

    def bumps(centres, scale=0.1):  # Gaussian bumps of equal mass
        return np.concatenate([rng.normal(c, scale, 1000 // len(centres)) for c in centres])

    samples = {
        "one bump": lambda: bumps([0.3]),
        "two bumps": lambda: bumps([-0.5, 0.5]),
        "three bumps": lambda: bumps([-0.6, 0.0, 0.6], scale=0.08),
        "bang-bang": lambda: np.r_[np.full(500, -1.0), np.full(500, 1.0)],
        "bound and bump": lambda: np.r_[np.full(700, 1.0), rng.normal(-0.4, 0.1, 300)],
        "broad": lambda: rng.normal(0.0, 0.4, 1000),
        "saturated": lambda: np.r_[np.full(950, -1.0), rng.uniform(-1, 1, 50)],
    }[name]()
    return np.clip(samples, -1.0, 1.0)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("one bump", 1), ("two bumps", 2), ("three bumps", 3), ("bang-bang", 2), ("bound and bump", 2), ("broad", 1),
     ("saturated", 1)],
)  # fmt: skip
def test_mode_counter_on_samples_with_known_modes(name, expected):
    """The mode counter on 1,000 samples, as raw points and through the probe's 0.01 histogram, over 5 draws each."""
    for seed in range(5):
        samples = known_modes(name, np.random.default_rng(seed))
        assert stats.count_modes(samples, np.ones_like(samples)) == expected, (name, seed, "raw")
        counts, edges = np.histogram(samples, bins=PROBE_BINS)
        assert stats.count_modes(edges[1:] - 0.005, counts) == expected, (name, seed, "histogram")


@pytest.mark.slow  # a subprocess
def test_study_summary_compares_variant_directories(tmp_path):
    """DIR/VARIANT/runs/: one row per variant and task, the variant's own flags (those its runs recorded that differ
    from the defaults, less those a resume may change), the probe state's share near +-1 and modes, and per task the
    variants' mean ± std at every step all of a variant's seeds reached."""
    from qsm_continuous import Args

    shared = {"env_id": "cheetah-run", "total_timesteps": 2000, "compile": True, "checkpoint_interval": 0}
    best16 = {"best_of_n": 16, "normalize_q_grad": True, "actor_hidden_dims": (64, 64)}
    for variant, final, flags in (("paper", 300.0, {}), ("best16", 500.0, best16)):
        for seed in (1, 2):
            args = Args(**shared, **flags, seed=seed)
            fake_run(tmp_path / variant, "cheetah-run", seed, [(1000, 100.0), (2000, final + seed)], [10.0], args=args)
    fake_run(tmp_path / "older", "cheetah-run", 1, [(2000, 400.0)], [10.0])  # a run of code that changed since:
    (tmp_path / "older" / "flags.txt").write_text("--M-q 7.35\n")  # flags.txt names its flags in today's terms
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "study.md").read_text()
    assert "| cheetah-run | best16 | 1 2 | 2000 | 501.5 ± 0.5 | nan% | 70% | 2.00 | 10.0 |" in table  # 700 at -1
    assert "| variant | 1k | 2k |" in table and "| best16 | 100 ± 0 | 502 ± 0 |" in table
    assert "| older |  | 400 ± 0 |" in table  # its one seed has no evaluation at 1k
    assert "| best16 | `--actor-hidden-dims 64 64 --normalize-q-grad --best-of-n 16` |" in table
    assert "| paper | `(the paper's defaults)` |" in table
    assert "| older | `--M-q 7.35` |" in table
    assert (tmp_path / "study_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*/actions_*.png"))) == 5  # beside each variant's runs


@pytest.mark.slow  # a subprocess
def test_summary_without_runs_is_one_line(tmp_path):
    result = bench("summary", str(tmp_path))
    assert result.returncode == 1 and result.stderr == f"error: no runs with evaluations under {tmp_path}/runs/\n"


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
        result = bench("--slurm", "--dry-run", "--env-ids", "cheetah-run", "--seeds", "1", "--time", time_limit,
                       "--out", str(tmp_path), "--", "--cuda")  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"#SBATCH --time={time_limit}\n#SBATCH --signal=B:USR1@{lead}\n" in result.stdout
        assert (
            "#SBATCH --gres=gpu:1\n" in result.stdout
            and f"'{tmp_path} qsm_continuous.py cheetah-run 1 --cuda'" in result.stdout
        )


def fake_checkpointed_run(out, flags, seed=1, copy=ROOT / "qsm_continuous.py", name="qsm_continuous"):
    """A run directory as the script leaves it, without the training: its copy of the script, a checkpoint's args."""
    import torch
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
    result = bench("--dry-run", "--env-ids", "cartpole-balance", "--seeds", "1", "2", "--out", str(tmp_path), "--",
                   "--total-timesteps", "900")  # fmt: skip
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
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"error: {run_dir} is another experiment {difference}")
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [run_dir.name]  # nothing started
        assert not (tmp_path / "qsm_array.sbatch").exists()  # nothing submitted


@pytest.mark.slow  # a subprocess
def test_variants_each_get_their_own_grid_directory(tmp_path):
    result = bench("--dry-run", "--env-ids", "cartpole-balance", "--seeds", "1", "--out", str(tmp_path),
                   "--variants", "paper", "small=--M-q 10", "--", "--total-timesteps", "900")  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        f"(cd {tmp_path}/paper && python qsm_continuous.py --env-id cartpole-balance --seed 1 --total-timesteps 900)",
        f"(cd {tmp_path}/small && python qsm_continuous.py --env-id cartpole-balance --seed 1 --M-q 10 "
        "--total-timesteps 900)",
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--env-ids", "cheetah_run"], "error: --env-ids 'cheetah_run' is not a dm_control task; valid ids: acrobot"),
        (["--workers", "0"], "error: --workers must be >= 1, got 0"),
        (["--", "--seed", "3"], "error: --seed in a run's flags is set by benchmark.sh itself; use --env-ids"),
        (["--variants", "a", "a=--M-q 1"], "error: --variants 'a=--M-q 1': each needs its own NAME of letters"),
        (["--variants", "x=nowhere.py"], "error: --variants 'x=nowhere.py': no such script "),
        (["--time", "10"], "error: --time is a Slurm time limit: use it with --slurm"),
        (["--slurm", "--time", "soon"], "error: --time soon: not a Slurm time limit; use minutes, HH:MM:SS"),
        (["--", "--M-q", "many"], "error: --M-q many --dry-run: not flags of"),  # bench adds --dry-run
    ],
)
def test_bad_grid_input_is_one_line(args, expected):
    """grid.main in this process: it ends in sys.exit("error: ..."), which Python prints as the one line, exit 1."""
    with pytest.raises(SystemExit) as exit_:
        grid.main([*args, "--dry-run"])
    assert exit_.value.code.startswith(expected) and "\n" not in exit_.value.code


@pytest.mark.slow  # a subprocess
def test_bad_grid_input_exits_1_in_one_line():
    result = bench("--env-ids", "cheetah_run", "--dry-run")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --env-ids 'cheetah_run' is not a dm_control task; valid ids: acrobot")


@pytest.mark.slow  # a subprocess
def test_local_grid_runs_seeds_in_parallel_and_summarises(tmp_path):
    flags = ["--total-timesteps", "600", "--learning-starts", "500", "--eval-interval", "300", "--eval-episodes", "1"]
    flags += ["--critic-hidden-dims", "64", "64", "--actor-hidden-dims", "64", "64"]
    result = bench("--env-ids", "cartpole-balance", "--seeds", "1", "2", "--workers", "2", "--out", str(tmp_path),
                   "--", *flags)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 runs, 2 at a time, 1 core(s) each" in result.stdout
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
    proc = start_bench("--env-ids", "cartpole-balance", "--seeds", "1", "2", "--workers", "1", "--out", str(tmp_path),
                       "--", *flags)  # fmt: skip
    runs = tmp_path / "runs"
    checkpoint = wait_until(lambda: next(runs.glob("*/checkpoint.pt"), None), 120, "the first checkpoint", proc)
    pid = int((checkpoint.parent / "run.lock").read_text().split()[-3])  # "pid N on HOST"
    (os.killpg if group else os.kill)(proc.pid, signum)
    try:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signum, stderr[-2000:]  # not killed by it (-signum), not a traceback (1)
        said = f"{signum.name}: the grid stopped (1 runs not started); run the same command again to resume it\n"
        assert stderr == said  # one line, no traceback
        assert "cartpole-balance seed 1: stopped by a signal; run the same command again" in stdout
        log = (runs / "cartpole-balance__seed1.log").read_text()
        step = int(re.search(r"SIGTERM at step (\d+): checkpoint written", log)[1])  # one signal, passed on by the grid
        assert torch.load(checkpoint, weights_only=True)["global_step"] == step < 100000
        assert not (runs / "cartpole-balance__seed2.log").exists()  # never started
    finally:
        for alive in (proc.pid, pid):  # the old grid died at once and left its run running
            try:
                os.kill(alive, signal.SIGKILL)
            except ProcessLookupError:
                pass
    with pytest.raises(ProcessLookupError):  # the run had ended before the grid did
        os.kill(pid, 0)


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

    for status, failed, said in [(0, 0, "done in"), (143, 1, "stopped by a signal; run the same command again"),
                                 (130, 1, "stopped by a signal"), (-15, 1, "stopped by a signal"),
                                 (1, 1, f"FAILED (status 1, see {launch.log_path(task)})")]:  # fmt: skip
        monkeypatch.setattr(launch.subprocess, "Popen", ending(status))
        assert launch.run_local([task], workers=1) == failed
        assert f"cartpole-balance seed 1: {said}" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["--modes", "fast"], "--modes 'fast' is unknown"),
        (["--modes", "compile+cudagraphs"], "needs --cuda"),
        (["--steps", "100"], "--steps must be at least 500"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--env-ids", "cheetah-walk"], "valid ids: acrobot-swingup"),
        (["--scripts", "nowhere.py"], "--scripts 'nowhere.py': no such file"),
    ],
)
def test_speed_bad_input_is_one_line(args, message):
    result = bench("speed", *args, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # a subprocess
def test_speed_table_from_a_real_short_run():
    """The speed subcommand trains the real script and times the pieces, here twice (--repeats 2): one row of medians,
    every figure positive, the range of the two training runs' steps/s. Small networks (a mode of flags): the
    mechanics, not the paper's sizes, are under test."""
    mode = "critic-hidden-dims=64+actor-hidden-dims=64"
    result = bench("speed", "--env-ids", "cartpole-balance", "--modes", mode, "--steps", "500", "--repeats", "2",
                   timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"round 1/2: qsm_continuous.py cartpole-balance {mode}" in result.stderr
    assert f"round 2/2: qsm_continuous.py cartpole-balance {mode}" in result.stderr
    assert f"| vs {mode} |" in result.stdout and "the median of 2 rounds" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if f"| cartpole-balance | {mode} |" in line]
    assert row.startswith("| qsm_continuous.py |")
    cells = [cell.strip() for cell in row.strip("|").split("|")[3:]]
    train, low, high = (float(x) for x in re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", cells[0]).groups())
    assert 0 < low <= train <= high, row
    assert len(cells) == 6 and all(float(x) > 0 for x in cells[1:5]), row  # (the ratio columns: the test below)


def test_speed_ratios_are_medians_of_same_round_ratios(capsys):
    """Each ratio column divides a row's training steps/s by its reference's in the same round, then takes the median
    over rounds: a round where the machine ran slow for everything cancels out."""
    import speed

    opts = speed.parse(["--env-ids", "cheetah-run", "--modes", "eager", "compile", "--repeats", "3", "--scripts",
                        str(ROOT / "qsm_continuous.py"), str(ROOT / "benchmark.sh")])  # fmt: skip
    old, new = opts.scripts[0], opts.scripts[1]
    per_round = {(old, "eager"): [10, 20, 10], (old, "compile"): [12, 24, 13], (new, "eager"): [11, 19, 10],
                 (new, "compile"): [13, 25, 12]}  # fmt: skip
    runs = {(s, "cheetah-run", m): [(v, 1.0, 1.0, 1.0, 1.0) for v in values] for (s, m), values in per_round.items()}
    speed.print_table(runs, opts, {old: "old.py", new: "new.py"})
    lines = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.startswith(("| old", "| new"))]
    rows = {tuple(c.strip() for c in cells[1:4]): [c.strip() for c in cells[4:-1]] for cells in lines}
    assert rows["old.py", "cheetah-run", "compile"][0] == "13.0 (12.0-24.0)"
    assert rows["old.py", "cheetah-run", "compile"][-2:] == ["1.20x", "1.00x"]  # vs eager: 1.2, 1.2, 1.3
    assert rows["new.py", "cheetah-run", "eager"][-2:] == ["1.00x", "1.00x"]  # vs old: 1.1, 0.95, 1.0
    assert rows["new.py", "cheetah-run", "compile"][-2:] == ["1.20x", "1.04x"]  # 1.18, 1.32, 1.2; 1.08, 1.04, 0.92


@pytest.mark.slow  # a subprocess
def test_the_readme_results_are_what_the_summary_computes_from_the_committed_runs(tmp_path):
    """docs/results/results.md is the summary of the committed TensorBoard files (runs and reruns), rebuilt here from a
    copy of them; every row of the README's results table and its aggregate line are lines of it, word for word."""
    import shutil

    for sub in ("runs", "rerun"):
        shutil.copytree(ROOT / "docs" / "results" / sub, tmp_path / sub)
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rebuilt = (tmp_path / "results.md").read_text()
    assert rebuilt == (ROOT / "docs" / "results" / "results.md").read_text()
    readme = (ROOT / "README.md").read_text().split("## Results")[1].split("\n## ")[0]
    rows = [
        line for line in readme.splitlines() if line.startswith(("| ", "Aggregate")) and not line.startswith("| task")
    ]
    assert rows and all(row in rebuilt.splitlines() for row in rows), rows
    assert any(row.startswith("Aggregate") for row in rows) == ("Aggregate at step" in rebuilt)
