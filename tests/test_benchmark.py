"""benchmark.sh: the summary of TensorBoard files, the Slurm script, and a small local grid."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def bench(*args, timeout=600):
    # benchmark.sh runs `python`: this interpreter's, as in an activated virtual environment
    env = {**os.environ, "MUJOCO_GL": "disable", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", str(ROOT / "benchmark.sh"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


def fake_run(out, env_id, seed, evals, sps):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(out / "runs" / f"{env_id}__qsm_continuous__{seed}__1700000000"))
    for step, value in evals:
        writer.add_scalar("eval/episodic_return", value, step)
    for i, value in enumerate(sps):
        writer.add_scalar("charts/SPS", value, 100 * (i + 1))
    for dim in range(2):
        writer.add_histogram(f"eval/action_dim_{dim}", np.r_[np.full(700, -1.0), np.full(300, 0.5)], evals[-1][0])
    writer.close()


def test_summary_of_synthetic_runs(tmp_path):
    fake_run(tmp_path, "cheetah-run", 1, [(1000, 100.0), (2000, 300.0)], [10.0, 30.0])
    fake_run(tmp_path, "cheetah-run", 2, [(1000, 600.0), (2000, 500.0)], [20.0])
    fake_run(tmp_path, "walker-walk", 1, [(1000, 50.0)], [])
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["env_id"]: row for row in csv.DictReader(open(tmp_path / "results.csv"))}
    cheetah = rows["cheetah-run"]
    # final: 300 and 500 -> 400 +- 100 (population std); best: 300 and 600 -> 450 +- 150; SPS: median of medians 20, 20
    assert float(cheetah["final_mean"]) == 400 and float(cheetah["final_std"]) == 100
    assert float(cheetah["best_mean"]) == 450 and float(cheetah["best_std"]) == 150
    assert cheetah["seeds"] == "1 2" and cheetah["steps"] == "2000" and float(cheetah["sps"]) == 20
    assert float(rows["walker-walk"]["final_mean"]) == 50 and rows["walker-walk"]["seeds"] == "1"
    table = (tmp_path / "results.md").read_text()
    assert "| cheetah-run | 1 2 | 2000 | 400.0 ± 100.0 | 450.0 ± 150.0 | 20.0 | 595 / 730 | 542 / 596 |" in table
    assert "TD-MPC2's published result files" in table and "Spinning Up" in table
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pictures = sorted(p.name for p in tmp_path.glob("actions_*.png"))  # one action-distribution picture per run
    assert pictures == [f"actions_{e}__qsm_continuous__{s}__1700000000.png" for e, s in
                        [("cheetah-run", 1), ("cheetah-run", 2), ("walker-walk", 1)]]  # fmt: skip


def test_study_summary_compares_variant_directories(tmp_path):
    """DIR/VARIANT/runs/: one row per variant and task, the variant's own flags, the probe state's share near +-1."""
    for variant, final, flags in (("paper", 300.0, ""), ("best16", 500.0, " --best-of-n 16")):
        for seed in (1, 2):
            fake_run(tmp_path / variant, "cheetah-run", seed, [(1000, 100.0), (2000, final + seed)], [10.0])
            log = tmp_path / variant / "runs" / f"cheetah-run__seed{seed}.log"
            log.write_text(f"$ python q.py --env-id cheetah-run --seed {seed} --compile --total-timesteps 2000"
                           f"{flags}  # cores [0]\n")  # fmt: skip
    fake_run(tmp_path / "older", "cheetah-run", 1, [(2000, 400.0)], [10.0])  # a run of code that changed since:
    (tmp_path / "older" / "flags.txt").write_text("--M-q 7.35\n")  # flags.txt names its flags in today's terms
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "study.md").read_text()
    assert "| cheetah-run | best16 | 1 2 | 2000 | 501.5 ± 0.5 | nan% | 70% | 10.0 |" in table  # 700 of 1,000 at -1
    assert "| best16 | `--best-of-n 16` |" in table and "| paper | `(the paper's defaults)` |" in table
    assert "| older | `--M-q 7.35` |" in table
    assert (tmp_path / "study_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*/actions_*.png"))) == 5  # beside each variant's runs


def test_summary_without_runs_is_one_line(tmp_path):
    result = bench("summary", str(tmp_path))
    assert result.returncode == 1 and result.stderr == f"error: no runs with evaluations under {tmp_path}/runs/\n"


def test_slurm_dry_run_prints_a_valid_array_script(tmp_path):
    result = bench("--slurm", "--dry-run", "--out", str(tmp_path), "--", "--total-timesteps", "5000")
    assert result.returncode == 0, result.stderr[-3000:]
    script = result.stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid bash
    assert "#SBATCH --array=0-17" in script and "#SBATCH --requeue" in script  # 6 tasks x 3 seeds
    envs = script.split("ENV_IDS=(")[1].split(")")[0].split()
    seeds = script.split("SEEDS=(")[1].split(")")[0].split()
    assert len(envs) == len(seeds) == 18 and envs.count("hopper-hop") == 3 and seeds[:3] == ["1", "2", "3"]
    assert "--total-timesteps 5000" in script and "--resume" in script
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_dry_run_resumes_runs_that_have_a_checkpoint(tmp_path):
    run_dir = tmp_path / "runs" / "cartpole-balance__qsm_continuous__2__1700000000"
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes(b"")
    result = bench("--dry-run", "--env-ids", "cartpole-balance", "--seeds", "1", "2", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = result.stdout.splitlines()
    assert "--seed 1" in first and "--resume" not in first
    assert "--seed 2 --resume runs/cartpole-balance__qsm_continuous__2__1700000000" in second


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--env-ids", "cheetah_run"], "error: --env-ids 'cheetah_run' is not a dm_control task; valid ids: acrobot"),
        (["--workers", "0"], "error: --workers must be >= 1, got 0"),
        (["--", "--seed", "3"], "error: --seed after -- is set by benchmark.sh itself; use --env-ids / --seeds"),
    ],
)
def test_bad_grid_input_is_one_line(args, expected):
    result = bench(*args, "--dry-run")
    assert result.returncode == 1 and result.stderr.startswith(expected) and result.stderr.count("\n") == 1


def test_local_grid_runs_seeds_in_parallel_and_summarises(tmp_path):
    flags = ["--total-timesteps", "600", "--learning-starts", "500", "--eval-interval", "300", "--eval-episodes", "1"]
    flags += ["--critic-hidden-dims", "64", "64", "--actor-hidden-dims", "64", "64"]
    result = bench("--env-ids", "cartpole-balance", "--seeds", "1", "2", "--workers", "2", "--out", str(tmp_path),
                   "--", *flags)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "2 runs, 2 at a time, 1 core(s) each" in result.stdout
    logs = sorted(p.name for p in (tmp_path / "runs").glob("*.log"))
    assert logs == ["cartpole-balance__seed1.log", "cartpole-balance__seed2.log"]
    assert len([p for p in (tmp_path / "runs").iterdir() if p.is_dir()]) == 2
    rows = list(csv.DictReader(open(tmp_path / "results.csv")))
    assert len(rows) == 1 and rows[0]["seeds"] == "1 2" and rows[0]["steps"] == "600"
    assert (tmp_path / "results.md").exists() and (tmp_path / "curves.png").exists()


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


def test_speed_table_from_a_real_short_run():
    """The speed subcommand trains the real script and times the pieces, here twice (--repeats 2): one row of medians,
    every figure positive, the range of the two training runs' steps/s, and eager over itself in the same round."""
    result = bench("speed", "--env-ids", "cartpole-balance", "--modes", "eager", "--steps", "500", "--repeats", "2",
                   timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "round 1/2: qsm_continuous.py cartpole-balance eager" in result.stderr
    assert "round 2/2: qsm_continuous.py cartpole-balance eager" in result.stderr
    assert "| vs eager |" in result.stdout and "the median of 2 rounds" in result.stdout
    (row,) = [line for line in result.stdout.splitlines() if "| cartpole-balance | eager |" in line]
    assert row.startswith("| qsm_continuous.py |")
    cells = [cell.strip() for cell in row.strip("|").split("|")[3:]]
    train, low, high = (float(x) for x in re.fullmatch(r"([\d.]+) \(([\d.]+)-([\d.]+)\)", cells[0]).groups())
    assert 0 < low <= train <= high, row
    assert len(cells) == 6 and all(float(x) > 0 for x in cells[1:5]) and cells[5] == "1.00x", row


def test_speed_ratios_are_medians_of_same_round_ratios(capsys):
    """Each ratio column divides a row's training steps/s by its reference's in the same round, then takes the median
    over rounds: a round where the machine ran slow for everything cancels out."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
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
