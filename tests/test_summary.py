"""bash benchmark.sh summary (benchmarks/report.py, stats.py): the tables, curves and aggregate of TensorBoard files,
synthetic and committed, and the README's results as the summary of the committed runs."""

import csv
import hashlib
import re
import sys

import numpy as np
import pytest
import report
import stats
from helpers import ROOT, bench

PROBE_BINS = np.linspace(-1.0, 1.0, 201)  # the script's probe histogram


def fake_run(out, env_id, seed, evals, sps, probe=None, bins=PROBE_BINS, args=None, script=None, machine=None):
    """A run's TensorBoard file: eval returns, SPS and, at the last evaluation, the probe samples of 2 action dims;
    given args (an Args), its arguments as the script records them; given script (a path), the run's copy of it;
    given machine (cores, threads), the script's record of them."""
    from torch.utils.tensorboard import SummaryWriter

    run_dir = out / "runs" / f"{env_id}__qsm_continuous__{seed}__1700000000"
    writer = SummaryWriter(str(run_dir))
    if script is not None:
        (run_dir / script.name).write_bytes(script.read_bytes())
    if machine is not None:
        writer.add_text("machine", f"vm: {machine[0]} cores, {machine[1]} torch threads", 0)
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
    assert "Aggregate: needs a dm_control task with 3 or more seeds" in (tmp_path / "results.md").read_text()


@pytest.mark.slow  # a subprocess
def test_gymnasium_tasks_are_summarised_but_left_out_of_the_aggregate(tmp_path):
    """A Gymnasium task's return has no bound, so return / 1000 means nothing: its rows and curves are there, the
    aggregate stays over the dm_control tasks and names the task it left out."""
    for seed, value in enumerate([300.0, 400.0, 500.0], start=1):
        fake_run(tmp_path, "cheetah-run", seed, [(1000, value)], [20.0])
        fake_run(tmp_path, "Hopper-v5", seed, [(100_000, 3000.0 + value)], [20.0])
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "results.md").read_text()
    assert "| Hopper-v5 | 1 2 3 | 100000 | 3400.0 ± 81.6 | 2613 ± 991 |" in text  # SAC: Tianshou's, not TD-MPC2's
    assert "SAC on Gymnasium's tasks: Tianshou's MuJoCo benchmark (10 seeds" in text
    assert "Aggregate at step 1000 over cheetah-run (3 seeds each): IQM" in text and "QSM 0.400 [" in text
    assert "Left out of it: Hopper-v5 (Gymnasium's returns have no bound" in text


@pytest.mark.slow  # plots
def test_the_published_references_follow_the_rows_step_to_the_papers_horizon(tmp_path, capsys):
    """The best published is the one at the row's step (at 1M not the 100k one), none between the published steps;
    TD3, published at 500k and 1M only, joins the curves and the references line once a run reaches 500k."""
    fake_run(tmp_path, "cheetah-run", 1, [(100_000, 250.0), (250_000, 450.0)], [20.0])
    report.summarize(str(tmp_path))
    table = (tmp_path / "results.md").read_text()
    assert "| cheetah-run | 1 | 250000 | 450.0 ± 0.0 | - | - |" in table  # SAC and the best: every 100k, at 100k/1M
    assert report.TD3_SOURCE not in table
    fake_run(tmp_path, "hopper-hop", 1, [(100_000, 0.0), (1_000_000, 120.0)], [20.0])
    report.summarize(str(tmp_path))
    table = (tmp_path / "results.md").read_text()
    assert "| hopper-hop | 1 | 1000000 | 120.0 ± 0.0 | 70 ± 100 | 445 (BRO) |" in table  # SAC's seeds 0, 211.5, 0
    assert report.TD3_SOURCE in table


# Tianshou's own summary of its 10 seeds (the rew and rew:shaded columns of test_rew_10seeds.csv): the mean and
# population std of the seeds report.SAC took from the same rows, each rounded to 0.1.
TIANSHOU_MEAN_STD = {
    ("HalfCheetah-v5", 0): (-2.0271, 0.7352),
    ("HalfCheetah-v5", 50_000): (4747.2399, 345.0121),
    ("HalfCheetah-v5", 100_000): (6514.6227, 514.2304),
    ("Hopper-v5", 0): (47.4556, 36.0937),
    ("Hopper-v5", 50_000): (851.1729, 372.5027),
    ("Hopper-v5", 100_000): (2613.4592, 990.7811),
    ("Walker2d-v5", 0): (6.442, 12.7772),
    ("Walker2d-v5", 50_000): (695.3813, 413.9007),
    ("Walker2d-v5", 100_000): (1305.246, 795.0855),
}


@pytest.mark.parametrize(("env_id", "step"), list(TIANSHOU_MEAN_STD))
def test_the_gymnasium_sac_seeds_are_tianshous(env_id, step):
    """A seed mistyped (or taken from another row or file) moves the mean or the std off the file's own columns."""
    assert stats.mean_std(report.SAC[env_id][step]) == pytest.approx(TIANSHOU_MEAN_STD[env_id, step], abs=0.1)


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
    [
        ("one bump", 1),
        ("two bumps", 2),
        ("three bumps", 3),
        ("bang-bang", 2),
        ("bound and bump", 2),
        ("broad", 1),
        ("saturated", 1),
    ],
)
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
    assert "| cheetah-run | best16 | 1 2 | 2000 | 501.5 ± 0.5 | nan% | 70% | 2.00 | 10.0 (?) |" in table  # 700 at -1
    assert "| variant | 1k | 2k |" in table and "| best16 | 100 ± 0 | 502 ± 0 |" in table
    assert "| older |  | 400 ± 0 |" in table  # its one seed has no evaluation at 1k
    assert (
        "| best16 | ? (no copy in the run) | `--actor-hidden-dims 64 64 --normalize-q-grad --best-of-n 16` |" in table
    )
    assert "| paper | ? (no copy in the run) | `(the paper's defaults)` |" in table
    assert "| older | ? (no copy in the run) | `--M-q 7.35` |" in table
    assert (tmp_path / "study_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list(tmp_path.glob("*/actions_*.png"))) == 5  # beside each variant's runs


@pytest.mark.slow  # imports the script and plots
def test_a_study_names_each_variants_script_its_runs_machines_and_episodes(tmp_path):
    """A copy of the script (qsm_timeweight.py, qsm_loss edited) beside the original: the study names each variant's
    script, its digest and the definitions it changed; the footnote's episodes are the runs' recorded ones (2, not
    "5"); each run's cores x threads, and a warning where the variants' differ."""
    from qsm_continuous import Args

    original = ROOT / "qsm_continuous.py"
    copy = tmp_path / "qsm_timeweight.py"
    case = '        case "paper":  # -M_q grad_a Q(s, a_t)\n            target = q_term\n'
    copy.write_text(original.read_text().replace(case, case.replace("q_term\n", "(1.0 - alpha_bar) * q_term\n")))
    args = Args(env_id="cartpole-swingup", eval_episodes=2)
    for variant, script, machine in (("paper", original, (1, 1)), ("timeweight", copy, (2, 2))):
        fake_run(
            tmp_path / variant, "cartpole-swingup", 1, [(1000, 10.0)], [5.0], args=args, script=script, machine=machine
        )
    report.summarize_study(str(tmp_path))
    table = (tmp_path / "study.md").read_text()
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()[:8]
    assert f"| timeweight | qsm_timeweight.py ({digest}; differs from the baseline's in qsm_loss) |" in table
    assert (
        f"| paper | qsm_continuous.py ({hashlib.sha256(original.read_bytes()).hexdigest()[:8]}, the baseline's) |"
        in table
    )
    assert "(2 episodes each, as the runs recorded)" in table and "5 episodes" not in table
    assert "| 5.0 (1x1) |" in table and "| 5.0 (2x2) |" in table
    assert "Here they differ (1x1, 2x2): the steps/s are not a difference of the variants." in table


def test_the_probability_of_improvement_per_task_and_over_tasks_with_its_interval():
    """Every seed of the variant above every seed of the baseline: P = 1 with the interval [1, 1]; interleaved seeds:
    an interval around 0.5; two seeds: not computed, and the line says why. A Gymnasium task has its own row but stays
    out of the row over tasks (its return / 1000 would swamp the IQM difference)."""
    curves = {
        "walker-walk": {"paper": [[(100, v)] for v in (500, 510, 520)], "new": [[(100, v)] for v in (600, 610, 620)]},
        "cheetah-run": {"paper": [[(100, v)] for v in (300, 320, 340)], "new": [[(100, v)] for v in (310, 330, 350)]},
        "hopper-hop": {"paper": [[(100, 0.0)], [(100, 1.0)]], "new": [[(100, 5.0)], [(100, 6.0)]]},
        "Hopper-v5": {"paper": [[(100, v)] for v in (1000, 1100, 1200)], "new": [[(100, v)] for v in (10, 20, 30)]},
    }
    lines = report.improvement_lines(curves, "paper")
    assert "| walker-walk | new | 100 | 3, 3 | 1.00 [1.00, 1.00] | +100.0 |" in lines
    (cheetah,) = [line for line in lines if line.startswith("| cheetah-run | new |")]
    p, low, high = map(float, re.search(r"\| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|", cheetah).groups())
    assert p == round(6 / 9, 2) and low < 0.5 < high  # 6 of the 9 pairs favour the variant (to 2 decimals)
    assert "| hopper-hop | new | - | 2, 2 | needs 3+ seeds of each | - |" in lines
    assert "| Hopper-v5 | new | 100 | 3, 3 | 0.00 [0.00, 0.00] | -1080.0 |" in lines
    (both,) = [line for line in lines if line.startswith("| 2 tasks | new |")]
    assert "| equal | 3, 3 | 0.83 [" in both and both.endswith("| +0.055 |")  # P: the mean of 1 and 6/9


@pytest.mark.slow  # a subprocess
def test_summary_without_runs_is_one_line(tmp_path):
    result = bench("summary", str(tmp_path))
    assert result.returncode == 2 and result.stderr == f"error: no runs with evaluations under {tmp_path}/runs/\n"


@pytest.mark.slow  # a subprocess
@pytest.mark.parametrize(("section", "results"), [("## Results", "results"), ("## Gymnasium MuJoCo", "gymnasium")])
def test_the_readme_results_are_what_the_summary_computes_from_the_committed_runs(tmp_path, section, results):
    """docs/{results}/results.md is the summary of the committed TensorBoard files (runs and any reruns), rebuilt here
    from a copy of them; every row of the README section's table and its aggregate line are lines of it, word for
    word."""
    import shutil

    for sub in ("runs", "rerun"):
        if (ROOT / "docs" / results / sub).is_dir():
            shutil.copytree(ROOT / "docs" / results / sub, tmp_path / sub)
    result = bench("summary", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    rebuilt = (tmp_path / "results.md").read_text()
    assert rebuilt == (ROOT / "docs" / results / "results.md").read_text()
    readme = (ROOT / "README.md").read_text().split(f"{section}\n")[1].split("\n## ")[0]
    rows = [
        line for line in readme.splitlines() if line.startswith(("| ", "Aggregate")) and not line.startswith("| task")
    ]
    assert rows and all(row in rebuilt.splitlines() for row in rows), rows
    assert any(row.startswith("Aggregate") for row in rows) == ("Aggregate at step" in rebuilt)


@pytest.mark.slow  # plots
def test_a_grid_summary_labels_train_steps_per_second_with_the_runs_cores_and_threads(tmp_path):
    """Runs that recorded their machine: the steps/s cell names cores x threads (both, where seeds differ); runs
    made before the record keep the table as it was (the committed results' rows, which the README quotes)."""
    fake_run(tmp_path, "cheetah-run", 1, [(1000, 10.0)], [5.0], machine=(1, 1))
    fake_run(tmp_path, "cheetah-run", 2, [(1000, 20.0)], [7.0], machine=(2, 2))
    report.summarize(str(tmp_path))
    table = (tmp_path / "results.md").read_text()
    assert "| train steps/s (cores x threads) |" in table and "| 6.0 (1x1 2x2) |" in table
