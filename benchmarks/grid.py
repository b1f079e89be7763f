"""`bash benchmark.sh [grid]` and `bash benchmark.sh summary DIR`: learning curves of qsm_continuous.py.

grid (the default): the command line of a grid or a study, then its summary. Trains qsm_continuous.py for every env id
x seed (defaults: the paper's six DMC tasks, seeds 1 2 3), FLAGS (everything after --) passed to every run, into
DIR/runs/ (default DIR: runs/benchmark); with --variants NAME[=FLAGS] ..., every variant too, into DIR/NAME/runs/.
benchmarks/launch.py starts the tasks (locally --workers at a time, or as a Slurm array with --slurm; --dry-run prints
the commands or the array script) and owns the rule of what a task resumes. Then the summary.
summary: reads DIR/runs/*/ TensorBoard files and writes DIR/results.md, DIR/results.csv, DIR/curves.png (eval
return vs environment steps, mean and min-max over seeds, with SAC and TD3 reference returns) and, per run,
DIR/actions_{run}.png (the policy's action distribution at a fixed initial state at its last evaluation).
Reruns: a run in DIR/rerun/runs/ (the same task, seed, command and commit as one in DIR/runs/) is compared with its
original: the mean gap between their eval curves against the gaps between the task's seeds.
A study: DIR holds one grid directory per variant (DIR/VARIANT/runs/), each trained with its own FLAGS; summary then
compares them: DIR/study.md, study.csv, study_curves.png, and DIR/VARIANT/actions_{run}.png for every run. A variant's
flags are those its runs recorded (the arguments in their event files that differ from today's defaults), or
DIR/VARIANT/flags.txt where the script changed since its runs.
"""

import argparse
import contextlib
import csv
import dataclasses
import glob
import io
import itertools
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import warnings

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch  # noqa: E402

SCRIPT = os.path.join(ROOT, "qsm_continuous.py")
PAPER_TASKS = ["cheetah-run", "walker-walk", "walker-run", "hopper-hop", "quadruped-walk", "humanoid-walk"]
# SAC at equal steps: the eval return of seeds 1, 2, 3 at 0 and 100k environment steps in TD-MPC2's published
# results/sac/{task}.csv (github.com/nicklashansen/tdmpc2; points every 100k). Best published at 100k: the methods' own
# result files (../shared/reference/qsm_facts.md).
SAC = {
    "cheetah-run": {0: (0.1, 0.1, 0.1), 100_000: (362.4, 236.9, 331.1)},
    "walker-walk": {0: (21.9, 21.7, 18.6), 100_000: (917.8, 509.6, 697.1)},
    "walker-run": {0: (21.4, 21.2, 18.2), 100_000: (367.8, 355.7, 295.2)},
    "quadruped-walk": {0: (51.5, 209.6, 198.4), 100_000: (59.6, 19.6, 86.5)},
    "hopper-hop": {0: (0.1, 0.0, 0.0), 100_000: (0.0, 0.0, 0.0)},
    "humanoid-walk": {0: (0.9, 0.8, 0.8), 100_000: (0.9, 1.4, 1.0)},
}
BEST_100K = {
    "cheetah-run": "648 (MR.Q)",
    "walker-walk": "967 (BRO)",
    "walker-run": "723 (TD-MPC2)",
    "quadruped-walk": "906 (SimbaV2)",
    "hopper-hop": "176 (SimbaV2)",
    "humanoid-walk": "34 (SimbaV2)",
}
SOURCES = "SAC: TD-MPC2's published result files (3 seeds); best published: the methods' own result files"
# At the study's step counts (the saturation issue): SAC at 100k (TD-MPC2's files), the best published at 100k/30k.
EARLY_REFERENCES = {"cheetah-run": {"SAC @100k": 310, "MR.Q @100k": 648},
                    "walker-walk": {"SAC @100k": 708, "BRO @100k": 967},
                    "cartpole-swingup": {"MR.Q/BRO @25-30k": 414}}  # fmt: skip
NEAR_BOUND, MODE_BANDWIDTH, MODE_PROMINENCE = 0.05, 0.1, 0.2  # the probe statistics' parameters (README, Results)


def fail(message):
    sys.exit(f"error: {message}")


def parse(argv):
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="bash benchmark.sh", description="see bash benchmark.sh --help")
    parser.add_argument("--summary-only", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--env-ids", nargs="+", default=PAPER_TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", metavar="NAME[=FLAGS]")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--slurm", action="store_true")
    parser.add_argument("--cpus-per-task", type=int, default=2)
    parser.add_argument("--time")
    parser.add_argument("--dry-run", action="store_true")
    opts = parser.parse_args(argv)
    opts.flags = flags
    for flag in ("--env-id", "--seed", "--resume"):
        if flag in flags or any(flag in shlex.split(v.partition("=")[2]) for v in opts.variants or []):
            fail(f"{flag} in a run's flags is set by benchmark.sh itself; use --env-ids / --seeds")
    if opts.time and not opts.slurm:
        fail("--time is a Slurm time limit: use it with --slurm")
    if opts.time and not launch.slurm_seconds(opts.time):
        fail(f"--time {opts.time}: not a Slurm time limit; use minutes, HH:MM:SS or D-HH:MM (e.g. 240, 4:00:00)")
    for flag, value in (("--workers", opts.workers), ("--cpus-per-task", opts.cpus_per_task)):
        if value < 1:
            fail(f"{flag} must be >= 1, got {value}")
    return opts


def variants(opts):
    """{name: (script, flags)}: --variants NAME=FLAGS, FLAGS led by a copy of the script (a .py file) or not; without
    --variants one grid, named "", in --out itself."""
    found = {}
    for variant in opts.variants or [""]:
        name, _, flags = variant.partition("=")
        flags = shlex.split(flags)
        script = os.path.abspath(flags.pop(0)) if flags and flags[0].endswith(".py") else SCRIPT
        if (variant and not re.fullmatch(r"[\w.-]+", name)) or name in found:
            fail(f"--variants {variant!r}: each needs its own NAME of letters, digits, '.', '_' or '-', then =FLAGS")
        if not os.path.isfile(script):
            fail(f"--variants {variant!r}: no such script {script}")
        found[name] = (script, [*flags, *opts.flags])
    return found


def tasks_of(opts):
    """Every variant x env id x seed as a launch.Task; a variant's runs in OUT/NAME/runs/."""
    grids = [
        (os.path.abspath(os.path.join(opts.out, name)), script, flags)
        for name, (script, flags) in variants(opts).items()
    ]
    return [
        launch.Task(out, script, env, seed, tuple(flags))
        for out, script, flags in grids
        for env in opts.env_ids
        for seed in opts.seeds
    ]


def qsm_module():
    """qsm_continuous imported (it imports dm_control: only when needed), or one line."""
    try:
        import qsm_continuous
    except ImportError as error:
        fail(f"{error}: activate the project's environment first (README, Setup: pip install -r requirements.txt)")
    return qsm_continuous


def run_dirs(grid_dir):
    """(run_dir, env_id, seed) for every run directory in grid_dir/runs/, named {env_id}__{exp_name}__{seed}__{time}."""
    for run_dir in sorted(glob.glob(os.path.join(grid_dir, "runs", "*__*__*__*"))):
        if os.path.isdir(run_dir):
            env_id, _, seed, _ = os.path.basename(run_dir).rsplit("__", 3)
            yield run_dir, env_id, int(seed)


def load_run(run_dir):
    """The run's TensorBoard files, read once (scalars and histograms, nothing dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def read_run(acc):
    tags = acc.Tags()["scalars"]
    evals = [(e.step, e.value) for e in acc.Scalars("eval/episodic_return")] if "eval/episodic_return" in tags else []
    sps = [e.value for e in acc.Scalars("charts/SPS")] if "charts/SPS" in tags else []
    return evals, sps


def histogram_points(h):
    """A TensorBoard histogram as (values, counts): the probe's 0.01-wide buckets at their centres; TensorBoard's
    default uneven buckets (runs before 8b38e17) at their limits, the one holding the minimum at the minimum."""
    limits, counts = np.array(h.bucket_limit), np.array(h.bucket, dtype=float)
    if len(limits) > 1 and np.allclose(np.diff(limits), 0.01, atol=1e-6):
        return limits - 0.005, counts
    lower = [-math.inf, *limits[:-1]]  # bucket i holds (lower_i, limit_i]: (-1.009, -0.917] of actions at -1 is at -1
    values = [h.min if lo < h.min <= hi else min(hi, h.max) for lo, hi in zip(lower, limits, strict=True)]
    return np.array(values), counts


def near_bounds(values, counts, within=NEAR_BOUND):
    """The share of the samples within `within` of -1 or +1."""
    return counts[np.abs(values) >= 1.0 - within].sum() / counts.sum()


def count_modes(values, counts, bandwidth=MODE_BANDWIDTH, min_prominence=MODE_PROMINENCE):
    """The modes of a distribution on [-1, 1] given as (value, count) points: the local maxima of its Gaussian kernel
    density estimate (bandwidth in action units, on a grid of step 0.01, zero outside [-1, 1] so that a pile of
    samples at a bound is a mode) that rise at least min_prominence of the highest maximum above their surroundings
    (scipy's topographic prominence)."""
    from scipy.signal import find_peaks

    grid = np.linspace(-1.0, 1.0, 201)
    density = (counts * np.exp(-0.5 * ((grid[:, None] - values) / bandwidth) ** 2)).sum(axis=1)
    peaks, _ = find_peaks(np.pad(density, 1), prominence=min_prominence * density.max())
    return len(peaks)


def probe_histograms(acc):
    """The probe's histogram events at the run's last evaluation, one per action component, in component order."""
    tags = sorted((t for t in acc.Tags()["histograms"] if t.startswith("eval/action_dim_")), key=lambda t: int(t[16:]))
    return [acc.Histograms(tag)[-1] for tag in tags]


def probe_stats(acc):
    """Per action component at the run's last evaluation: (step, [share near +-1], [number of modes])."""
    events = probe_histograms(acc)
    points = [histogram_points(event.histogram_value) for event in events]
    step = events[-1].step if events else None
    return step, [near_bounds(*p) for p in points], [count_modes(*p) for p in points]


def probe_saturation(acc):
    """The share of the probe state's sampled action components near +-1 (last evaluation), over all components."""
    _, shares, _ = probe_stats(acc)
    return statistics.fmean(shares) if shares else float("nan")


def recorded_flags(acc, args_type, same_experiment):
    """The flags of a run as its event file records its arguments (the `hyperparameters` text of a new run) that
    differ from args_type's defaults, in the script's field order, without the ones in same_experiment (those a
    resume may change, the env id and the seed); None for a run without the record."""
    if "hyperparameters/text_summary" not in acc.Tags()["tensors"]:
        return None
    table = acc.Tensors("hyperparameters/text_summary")[0].tensor_proto.string_val[0].decode()
    recorded = dict(row.strip("|").split("|", 1) for row in table.splitlines()[2:])
    flags = []
    for field in dataclasses.fields(args_type):
        value, default = recorded.get(field.name), str(field.default)
        if field.name in same_experiment or value is None or value == default:
            continue
        flag = f"--{field.name.replace('_', '-')}"
        if value in ("True", "False"):
            flags.append(flag if value == "True" else f"--no-{flag[2:]}")
        else:
            flags += [flag, value.strip("()").replace(",", "")]  # a tuple (512, 512) as 512 512
    return " ".join(flags) or "(the paper's defaults)"


def summarize_study(out):
    """DIR/VARIANT/runs/* for every variant: one table and one figure comparing the variants, task by task."""
    qsm = qsm_module()
    rows, curves = [], {}
    for variant_dir in sorted(d for d in glob.glob(os.path.join(out, "*")) if os.path.isdir(os.path.join(d, "runs"))):
        variant = os.path.basename(variant_dir)
        flags_file = os.path.join(variant_dir, "flags.txt")  # flags in today's terms, where the code changed since
        flags = open(flags_file).read().strip() if os.path.exists(flags_file) else None
        by_env = {}
        for run_dir, env_id, seed in run_dirs(variant_dir):
            acc = load_run(run_dir)
            flags = flags or recorded_flags(acc, qsm.Args, (*qsm.RUN_FIELDS, "env_id", "seed"))
            evals, sps = read_run(acc)
            if not evals:
                continue
            tag = "charts/action_saturation"
            sat = [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
            by_env.setdefault(env_id, []).append((seed, evals, sps, sat[-1] if sat else float("nan"), acc))
            plot_actions(variant_dir, run_dir, acc)
        for env_id, seeds in sorted(by_env.items()):
            steps = min(evals[-1][0] for _, evals, *_ in seeds)
            final = [dict(evals)[steps] for _, evals, *_ in seeds if steps in dict(evals)]
            sps = [statistics.median(s[2]) for s in seeds if s[2]]
            rows.append({"variant": variant, "env_id": env_id, "seeds": " ".join(str(s[0]) for s in sorted(seeds)),
                         "steps": steps, "final_mean": mean_std(final)[0], "final_std": mean_std(final)[1],
                         "saturation": statistics.fmean(s[3] for s in seeds),
                         "probe_saturation": statistics.fmean(probe_saturation(s[4]) for s in seeds),
                         "sps": statistics.median(sps) if sps else float("nan"), "flags": flags or "?"})  # fmt: skip
            curves.setdefault(env_id, {})[variant] = [evals for _, evals, *_ in seeds]
    if not rows:
        fail(f"no runs with evaluations under {out}/*/runs/")
    write_csv(os.path.join(out, "study.csv"), rows)
    lines = ["| task | variant | seeds | steps | eval return | saturation (training) | probe state: near +-1 | "
             "train steps/s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["env_id"], r["variant"])):
        returns = f"{r['final_mean']:.1f} ± {r['final_std']:.1f}"
        lines.append(f"| {r['env_id']} | {r['variant']} | {r['seeds']} | {r['steps']} | {returns} | "
                     f"{r['saturation']:.0%} | {r['probe_saturation']:.0%} | {r['sps']:.1f} |")  # fmt: skip
    lines += ["", "Eval return: mean ± std over seeds at the last step all seeds reached (5 episodes each).",
              "Saturation (training): the share of action components at exactly -1 or +1 in the TD target's samples "
              "at the last logged step. Probe state: the share near +-1 (|a| > 0.917, the histogram's resolution) "
              "of 1,000 samples at the task's fixed initial state (the paper's Figure 4) at the last evaluation.",
              "", "| variant | flags |", "|---|---|"]  # fmt: skip
    lines += [f"| {v} | `{f}` |" for v, f in sorted({(r["variant"], r["flags"]) for r in rows})] + [""]
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write("\n".join(lines))
    plot_study(out, curves)
    print("\n".join(lines))
    print(f"wrote {out}/study.md, {out}/study.csv, {out}/study_curves.png and {out}/*/actions_*.png")


def plot_study(out, curves):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    colors = {v: f"C{k}" for k, v in enumerate(sorted({v for variants in curves.values() for v in variants}))}
    for ax, (env_id, variants) in zip(axes[0], sorted(curves.items()), strict=True):
        for variant, runs in sorted(variants.items()):
            plot_seeds(ax, runs, colors[variant], f"{variant} ({len(runs)} seed(s))", alpha=0.15)
        for j, (name, value) in enumerate(EARLY_REFERENCES.get(env_id, {}).items()):
            ax.axhline(value, color="gray", linestyle=("--", ":")[j % 2], label=f"{name}: {value}")
        ax.set(title=env_id, xlabel="environment steps", ylabel="eval return", ylim=(0, 1000))
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("QSM variants: mean and min-max over seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "study_curves.png"), dpi=120)


def mean_std(values):
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def iqm_ci(scores):
    """The interquartile mean of a (runs x tasks) score matrix and its 95% stratified-bootstrap confidence interval
    (rliable, 50,000 resamples of the runs within each task, a fixed seed): (iqm, low, high)."""
    from rliable import library, metrics

    state = np.random.get_state()
    np.random.seed(0)  # rliable 1.2's StratifiedBootstrap draws its resamples from np.random, not from random_state
    with warnings.catch_warnings():  # rliable hands arch the RandomState that arch now calls deprecated
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = library.get_interval_estimates({"x": np.asarray(scores, dtype=float)},
                                                         lambda x: np.array([metrics.aggregate_iqm(x)]), reps=50_000,
                                                         random_state=np.random.RandomState(0))  # fmt: skip
    np.random.set_state(state)
    return point["x"][0], interval["x"][0, 0], interval["x"][1, 0]


def summarize(out):
    """DIR/runs/*: per task the eval return over seeds at each evaluation and at the last step every seed reached,
    SAC at the same step, the IQM over the tasks with 3+ seeds, and the probe state's share near +-1 and modes."""
    runs, probes = {}, []
    for run_dir, env_id, seed in run_dirs(out):
        acc = load_run(run_dir)
        evals, sps = read_run(acc)
        if not evals:
            continue
        step, shares, modes = probe_stats(acc)
        runs.setdefault(env_id, {})[seed] = (dict(evals), sps, shares, modes)
        probes += [{"env_id": env_id, "seed": seed, "step": step, "action_dim": dim, "near_bounds": share,
                    "modes": n} for dim, (share, n) in enumerate(zip(shares, modes, strict=True))]  # fmt: skip
        plot_actions(out, run_dir, acc)
    if not runs:
        fail(f"no runs with evaluations under {out}/runs/")
    rows, curves = [], []
    for env_id, seeds in sorted(runs.items()):
        steps = min(max(evals) for evals, *_ in seeds.values())  # the last step that every seed reached
        common = sorted(set.intersection(*(set(evals) for evals, *_ in seeds.values())))
        for step in common:
            mean, std = mean_std([evals[step] for evals, *_ in seeds.values()])
            curves.append({"env_id": env_id, "step": step, "seeds": len(seeds), "mean": mean, "std": std})
        sac = SAC.get(env_id, {}).get(steps)
        modes = [n for *_, ms in seeds.values() for n in ms]
        sps = [statistics.median(s) for _, s, *_ in seeds.values() if s]
        final_mean, final_std = mean_std([evals.get(steps, math.nan) for evals, *_ in seeds.values()])
        rows.append({
            "env_id": env_id, "seeds": " ".join(map(str, sorted(seeds))), "steps": steps,
            "final_mean": final_mean, "final_std": final_std,
            "sac_mean": mean_std(sac)[0] if sac else math.nan, "sac_std": mean_std(sac)[1] if sac else math.nan,
            "best_published_100k": BEST_100K.get(env_id, "-"),
            "near_bounds": statistics.fmean(s for *_, shares, _ in seeds.values() for s in shares or [math.nan]),
            "modes_mean": statistics.fmean(modes) if modes else math.nan,
            "multimodal": sum(n > 1 for n in modes) / len(modes) if modes else math.nan,
            "sps": statistics.median(sps) if sps else math.nan,
        })  # fmt: skip
    write_csv(os.path.join(out, "results.csv"), rows)
    write_csv(os.path.join(out, "curves.csv"), curves)
    if probes:
        write_csv(os.path.join(out, "probes.csv"), probes)
    lines = ["| task | seeds | steps | QSM eval return | SAC, same step | best published @100k | probe: near ±1 | "
             "probe: modes per action | components with 2+ modes | train steps/s |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        sac = f"{r['sac_mean']:.0f} ± {r['sac_std']:.0f}" if not math.isnan(r["sac_mean"]) else "-"
        lines.append(f"| {r['env_id']} | {r['seeds']} | {r['steps']} | {r['final_mean']:.1f} ± {r['final_std']:.1f} | "
                     f"{sac} | {r['best_published_100k']} | {r['near_bounds']:.0%} | {r['modes_mean']:.2f} | "
                     f"{r['multimodal']:.0%} | {r['sps']:.1f} |")  # fmt: skip
    lines += ["", aggregate_line(runs, rows), "", "Learning curves, mean ± std over seeds:", ""]
    steps = sorted({c["step"] for c in curves})
    lines += ["| task | " + " | ".join(f"{s // 1000}k" if s % 1000 == 0 else str(s) for s in steps) + " |",
              "|---|" + "---|" * len(steps)]  # fmt: skip
    for env_id in sorted(runs):
        at = {c["step"]: f"{c['mean']:.0f} ± {c['std']:.0f}" for c in curves if c["env_id"] == env_id}
        lines.append(f"| {env_id} | " + " | ".join(at.get(s, "") for s in steps) + " |")
    lines += ["", "Eval return: mean ± std (population) over seeds at the last step that every seed of the task "
              "reached (5 episodes per evaluation by default). Probe: 1,000 actions sampled at the task's fixed "
              f"initial state at each run's last evaluation; near ±1: within {NEAR_BOUND} of a bound; modes: local "
              f"maxima of a Gaussian kernel density estimate (bandwidth {MODE_BANDWIDTH}) with a prominence of at "
              f"least {MODE_PROMINENCE:.0%} of the highest, per action component, averaged over components and seeds.",
              f"References: {SOURCES}.", ""]  # fmt: skip
    lines += rerun_lines(out, runs)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    plot(out, runs)
    print("\n".join(lines))
    print(f"wrote {out}/results.md, results.csv, curves.csv, probes.csv, curves.png and actions_*.png")


def aggregate_line(runs, rows):
    """The IQM of the normalised score (return / 1000) over the tasks with 3+ seeds, at their common last step, with
    its 95% confidence interval, and SAC's on the same tasks at the same step. rliable takes a (runs x tasks) matrix:
    each task gives as many seeds as the one with the fewest, its lowest-numbered; the line names any left out."""
    final = {r["env_id"]: r["steps"] for r in rows}
    tasks = [env_id for env_id, seeds in sorted(runs.items()) if len(seeds) >= 3]
    if not tasks or len({final[env_id] for env_id in tasks}) > 1:
        return "Aggregate: needs a task with 3 or more seeds (every such task at the same last step)."
    step, n = final[tasks[0]], min(len(runs[env_id]) for env_id in tasks)
    used = {env_id: sorted(runs[env_id])[:n] for env_id in tasks}
    qsm = [[runs[env_id][used[env_id][i]][0][step] / 1000 for env_id in tasks] for i in range(n)]
    left_out = [f"{env_id} seed {seed}" for env_id in tasks for seed in sorted(runs[env_id])[n:]]
    line = f"Aggregate at step {step} over {', '.join(tasks)} ({n} seeds each"
    line += f"; left out: {', '.join(left_out)})" if left_out else ")"
    line += ": IQM of the normalised score (return / 1000) QSM {:.3f} [{:.3f}, {:.3f}]".format(*iqm_ci(qsm))
    if all(step in SAC.get(env_id, {}) for env_id in tasks):
        sac = [[SAC[env_id][step][i] / 1000 for env_id in tasks] for i in range(3)]
        line += ", SAC (3 seeds each) {:.3f} [{:.3f}, {:.3f}]".format(*iqm_ci(sac))
    return line + " (95% stratified-bootstrap confidence intervals, rliable)."


def curve_gap(a, b):
    """The mean absolute difference of two eval curves ({step: return}) over the steps that both reached."""
    return statistics.fmean(abs(a[step] - b[step]) for step in sorted(set(a) & set(b)))


def rerun_lines(out, runs):
    """DIR/rerun/runs/*: each rerun's curve gap to its original, against the gaps between every two of the task's
    seeds; within seed noise when it is no larger than the largest of them (a coarse test with 3 seeds)."""
    lines = []
    for run_dir, env_id, seed in run_dirs(os.path.join(out, "rerun")):
        evals, task = dict(read_run(load_run(run_dir))[0]), runs.get(env_id, {})
        if seed not in task or len(task) < 2 or not evals:
            continue
        original, seeds = task[seed][0], [curve for curve, *_ in task.values()]
        gap, pairs = curve_gap(evals, original), [curve_gap(a, b) for a, b in itertools.combinations(seeds, 2)]
        last = max(set(evals) & set(original))
        lines.append(f"| {env_id} | {seed} | {last} | {evals[last]:.0f} | {original[last]:.0f} | {gap:.0f} | "
                     f"{min(pairs):.0f}-{max(pairs):.0f} | {'yes' if gap <= max(pairs) else 'no'} |")  # fmt: skip
    if not lines:
        return []
    return ["Reruns (rerun/runs/) against their originals: mean absolute gap between the eval curves, and between "
            "every two seeds of the task:", "",
            "| task | seed | last step | rerun | original | gap to the original | gaps between seeds | within |",
            "|---|---|---|---|---|---|---|---|", *lines, ""]  # fmt: skip


def plot_actions(out, run_dir, acc):
    """The policy's action distribution at the fixed probe state at the run's last evaluation (paper, Figure 4)."""
    events = probe_histograms(acc)
    if not events:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(events), figsize=(max(5.0, 2.2 * len(events) + 1), 2.4), squeeze=False)
    for dim, (ax, event) in enumerate(zip(axes[0], events, strict=True)):
        values, counts = histogram_points(event.histogram_value)
        ax.hist(values, bins=40, range=(-1.0, 1.0), weights=counts)  # re-binned on [-1, 1]
        ax.set(title=f"action {dim}", xlim=(-1.05, 1.05), yticks=[])
    name = os.path.basename(run_dir)
    fig.suptitle(f"{name}\n1,000 actions sampled at one initial state, step {events[-1].step}", fontsize=7)
    fig.tight_layout()
    path = os.path.join(out, f"actions_{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_seeds(ax, runs, color, label, alpha):
    """Eval return over the steps every seed evaluated: the mean, and the min-max band over seeds."""
    steps = sorted(set.intersection(*(set(s for s, _ in evals) for evals in runs)))
    values = [[dict(evals)[s] for s in steps] for evals in runs]
    ax.plot(steps, [statistics.fmean(v[i] for v in values) for i in range(len(steps))], color=color, label=label)
    low, high = ([f(v[i] for v in values) for i in range(len(steps))] for f in (min, max))
    ax.fill_between(steps, low, high, color=color, alpha=alpha)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(out, runs):
    """Eval return against environment steps per task: QSM's mean and min-max band over seeds, and SAC's seeds at the
    same steps (mean, min-max bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(n / cols)), squeeze=False)
    for ax, (env_id, seeds) in zip(axes.flat, sorted(runs.items()), strict=False):
        last = max(max(evals) for evals, *_ in seeds.values())
        plot_seeds(
            ax, [sorted(evals.items()) for evals, *_ in seeds.values()], "C0", f"QSM, {len(seeds)} seed(s)", 0.25
        )
        sac = {step: values for step, values in SAC.get(env_id, {}).items() if step <= last}
        if sac:
            steps, values = list(sac), [np.array(v) for v in sac.values()]
            means = np.array([v.mean() for v in values])
            spread = np.clip([means - [v.min() for v in values], [v.max() for v in values] - means], 0.0, None)
            ax.errorbar(steps, means, yerr=spread, fmt="s", color="C3", capsize=3, label="SAC, 3 seeds (TD-MPC2)")
        ax.set(title=env_id, xlabel="environment steps", ylabel="eval return", ylim=(0, 1000))
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("QSM: mean and min-max over seeds; SAC: TD-MPC2's result files at the same steps", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)
    plt.close(fig)


def main(argv):
    opts = parse(argv)
    if opts.summary_only:
        study = not os.path.isdir(os.path.join(opts.summary_only, "runs"))
        (summarize_study if study and glob.glob(os.path.join(opts.summary_only, "*", "runs")) else summarize)(
            opts.summary_only
        )
        sys.exit(0)
    valid = qsm_module().ENV_IDS
    for env_id in opts.env_ids:
        if env_id not in valid:
            fail(f"--env-ids {env_id!r} is not a dm_control task; valid ids: {', '.join(valid)}")
    tasks = tasks_of(opts)
    for task in {(task.script, task.flags): task for task in tasks}.values():  # each variant's flags, parsed
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                launch.task_args(task)
        except SystemExit:
            fail(f"{shlex.join(task.flags)}: not flags of {os.path.relpath(task.script)} (its --help lists them)")
    if problem := launch.conflicts(tasks):  # before anything starts
        fail(problem)
    if opts.slurm:
        script = launch.sbatch_script(tasks, opts.out, opts.cpus_per_task, opts.time)
        if opts.dry_run:
            print(script, end="")
            sys.exit(0)
        os.makedirs(opts.out, exist_ok=True)
        path = os.path.join(opts.out, "qsm_array.sbatch")
        with open(path, "w") as f:
            f.write(script)
        if not shutil.which("sbatch"):
            fail(f"sbatch not found: wrote {path}; on the cluster, from an activated venv: sbatch {path} (its first "
                 "lines say how to point it at the checkout there)")  # fmt: skip
        # QSM_PYTHON: the tasks run this Python (sbatch passes the environment on), whatever the node's PATH
        subprocess.run(["sbatch", path], check=True, env={"QSM_PYTHON": sys.executable, **os.environ})
        print(f"submitted {path}; when the tasks are done: bash benchmark.sh summary {opts.out}")
        sys.exit(0)
    if opts.dry_run:  # what each task would run now
        for task in tasks:
            resume, _ = launch.own_run(task, launch.task_args(task))
            print(f"(cd {shlex.quote(task.out)} && {launch.logged(launch.command(task, resume))})")
        sys.exit(0)
    failed = launch.run_local(tasks, opts.workers)
    (summarize_study if opts.variants else summarize)(opts.out)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
