"""`bash benchmark.sh [grid]` and `bash benchmark.sh summary DIR`: learning curves of qsm_continuous.py.

grid (the default): trains qsm_continuous.py for every env id x seed (defaults: the paper's six DMC tasks, seeds
1 2 3), FLAGS (everything after --) passed to every run. Locally through a pool of --workers runs (default: one
per core), each pinned to its share of the cores; each run's log is kept beside its TensorBoard directory in
DIR/runs/ (default DIR: runs/benchmark). A run that has a checkpoint in DIR resumes it (--resume). --slurm writes
DIR/qsm_array.sbatch, an array job of one task per env x seed that requeues on pre-emption and resumes from the
checkpoint, and submits it with sbatch; --dry-run prints the script or the commands instead. Then the summary.
summary: reads DIR/runs/*/ TensorBoard files and writes DIR/results.md, DIR/results.csv, DIR/curves.png (eval
return vs environment steps, mean and min-max over seeds, with SAC and TD3 reference returns) and, per run,
DIR/actions_{run}.png (the policy's action distribution at a fixed initial state at its last evaluation).
A study: DIR holds one grid directory per variant (DIR/VARIANT/runs/), each trained with its own FLAGS; summary then
compares them: DIR/study.md, study.csv, study_curves.png, and DIR/VARIANT/actions_{run}.png for every run. A variant's
flags are read from its first run log, or from DIR/VARIANT/flags.txt where the script changed since its runs.
"""

import argparse
import csv
import glob
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "qsm_continuous.py")
PAPER_TASKS = ["cheetah-run", "walker-walk", "walker-run", "hopper-hop", "quadruped-walk", "humanoid-walk"]
# Reference returns (DMC, state observations) at 500k and 1M environment steps, from ../shared/reference/qsm_facts.md.
# SAC: TD-MPC2's published baseline result files (3 seeds). TD3: a public Spinning Up benchmark on DMC (8 seeds).
REFERENCES = {
    "cheetah-run": {"SAC": (595, 730), "TD3": (542, 596)},
    "walker-walk": {"SAC": (953, 957)},
    "walker-run": {"SAC": (604, 635), "TD3": (486, 531)},
    "quadruped-walk": {"SAC": (199, 455), "TD3": (361, 362)},
    "hopper-hop": {"SAC": (38, 70), "TD3": (15, 17)},
    "reacher-hard": {"SAC": (517, 928)},
    "finger-spin": {"SAC": (873, 878), "TD3": (766, 784)},
    "humanoid-walk": {"SAC": (1, 2)},
}
SOURCES = "SAC: TD-MPC2's published result files (3 seeds); TD3: a public Spinning Up benchmark on DMC (8 seeds)"
# At the study's step counts (the saturation issue): SAC at 100k (TD-MPC2's files), the best published at 100k/30k.
EARLY_REFERENCES = {"cheetah-run": {"SAC @100k": 310, "MR.Q @100k": 648},
                    "walker-walk": {"SAC @100k": 708, "BRO @100k": 967},
                    "cartpole-swingup": {"MR.Q/BRO @25-30k": 414}}  # fmt: skip


def fail(message):
    sys.exit(f"error: {message}")


def parse(argv):
    flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="bash benchmark.sh", description="see bash benchmark.sh --help")
    parser.add_argument("--summary-only", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--env-ids", nargs="+", default=PAPER_TASKS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", default="runs/benchmark")
    parser.add_argument("--slurm", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    opts = parser.parse_args(argv)
    opts.flags = flags
    for flag in ("--env-id", "--seed", "--resume"):
        if flag in flags:
            fail(f"{flag} after -- is set by benchmark.sh itself; use --env-ids / --seeds")
    if opts.workers < 1:
        fail(f"--workers must be >= 1, got {opts.workers}")
    return opts


def valid_env_ids():
    import qsm_continuous as qsm  # imports dm_control: only when needed

    return qsm.ENV_IDS


def existing_run(out, env_id, seed):
    """The run directory of env_id x seed in out/runs that has a checkpoint, or None."""
    found = sorted(glob.glob(os.path.join(out, "runs", f"{env_id}__*__{seed}__*", "checkpoint.pt")))
    return os.path.dirname(found[-1]) if found else None


def command(opts, env_id, seed):
    resume = existing_run(opts.out, env_id, seed)
    resume_args = ["--resume", os.path.relpath(resume, opts.out)] if resume else []
    return [sys.executable, SCRIPT, "--env-id", env_id, "--seed", str(seed), *resume_args, *opts.flags]


def run_local(opts, tasks):
    cores = sorted(os.sched_getaffinity(0))
    workers = min(opts.workers, len(tasks))
    share = max(1, len(cores) // workers)
    free = [cores[i * share : (i + 1) * share] or cores for i in range(workers)]  # one core set per worker
    lock = threading.Lock()
    os.makedirs(os.path.join(opts.out, "runs"), exist_ok=True)

    def one(task):
        env_id, seed = task
        with lock:
            my_cores = free.pop()
        try:
            cmd = command(opts, env_id, seed)
            log = os.path.join(opts.out, "runs", f"{env_id}__seed{seed}.log")  # beside the run's TensorBoard dir
            threads = str(len(my_cores))
            env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TQDM_DISABLE": "1"}
            start = time.time()
            with open(log, "a") as f:
                f.write(f"$ {shlex.join(cmd)}  # cores {my_cores}\n")
                f.flush()
                proc = subprocess.run(cmd, cwd=opts.out, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      preexec_fn=lambda: os.sched_setaffinity(0, my_cores))  # fmt: skip
            status = "done" if proc.returncode == 0 else f"FAILED (status {proc.returncode}, see {log})"
            print(f"{env_id} seed {seed}: {status} in {time.time() - start:.0f} s", flush=True)
            return proc.returncode
        finally:
            with lock:
                free.append(my_cores)

    print(f"{len(tasks)} runs, {workers} at a time, {share} core(s) each; logs in {opts.out}/runs/", flush=True)
    with ThreadPoolExecutor(workers) as pool:
        codes = list(pool.map(one, tasks))
    return sum(code != 0 for code in codes)


def sbatch_script(opts, tasks):
    envs = " ".join(env_id for env_id, _ in tasks)
    seeds = " ".join(str(seed) for _, seed in tasks)
    out = os.path.abspath(opts.out)
    return f"""#!/bin/bash
#SBATCH --job-name=qsm
#SBATCH --array=0-{len(tasks) - 1}
#SBATCH --cpus-per-task=2
#SBATCH --output={out}/runs/slurm-%A_%a.log
#SBATCH --requeue
# One task per env x seed. On pre-emption Slurm sends SIGTERM: the run checkpoints and exits, Slurm requeues the
# task (--requeue), and the task resumes from the checkpoint below.
set -euo pipefail
ENV_IDS=({envs})
SEEDS=({seeds})
env_id=${{ENV_IDS[$SLURM_ARRAY_TASK_ID]}}
seed=${{SEEDS[$SLURM_ARRAY_TASK_ID]}}
mkdir -p {out}/runs && cd {out}
resume=()
checkpoint=$(ls -d runs/"$env_id"__*__"$seed"__*/checkpoint.pt 2>/dev/null | tail -n 1 || true)
if [ -n "$checkpoint" ]; then resume=(--resume "$(dirname "$checkpoint")"); fi
export OMP_NUM_THREADS=${{SLURM_CPUS_PER_TASK:-2}} TQDM_DISABLE=1
exec {shlex.quote(sys.executable)} {shlex.quote(SCRIPT)} --env-id "$env_id" --seed "$seed" \\
    ${{resume[@]+"${{resume[@]}}"}} {shlex.join(opts.flags)}
"""


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


def probe_saturation(acc):
    """The share of the probe state's 1,000 sampled action components within 0.09 of +-1 (last evaluation): the
    resolution of TensorBoard's histogram buckets there, (-1.009, -0.917] and (0.917, 1.009]."""
    tags = [t for t in acc.Tags()["histograms"] if t.startswith("eval/action_dim_")]
    if not tags:
        return float("nan")
    at_bound = total = 0.0
    for tag in tags:
        h = acc.Histograms(tag)[-1].histogram_value
        lower = [h.min, *h.bucket_limit[:-1]]  # bucket i holds values in (lower_i, limit_i]
        at_bound += sum(c for lo, hi, c in zip(lower, h.bucket_limit, h.bucket, strict=True) if hi < -0.9 or lo > 0.9)
        total += h.num
    return at_bound / total


def variant_flags(command):
    """A run log's first line, `$ python script --env-id E --seed S [--resume R] FLAGS  # cores`, as the flags that
    tell the variants apart (the study's shared ones dropped)."""
    tokens, flags = command.split("#")[0].split()[3:], []
    while tokens:
        token = tokens.pop(0)
        if token in ("--env-id", "--seed", "--resume", "--total-timesteps", "--checkpoint-interval", "--eval-interval"):
            tokens.pop(0)
        elif token != "--compile":
            flags.append(token)
    return " ".join(flags) or "(the paper's defaults)"


def summarize_study(out):
    """DIR/VARIANT/runs/* for every variant: one table and one figure comparing the variants, task by task."""
    rows, curves = [], {}
    for variant_dir in sorted(d for d in glob.glob(os.path.join(out, "*")) if os.path.isdir(os.path.join(d, "runs"))):
        variant = os.path.basename(variant_dir)
        logs = sorted(glob.glob(os.path.join(variant_dir, "runs", "*.log")))
        flags_file = os.path.join(variant_dir, "flags.txt")  # flags in today's terms, where the code changed since
        if os.path.exists(flags_file):
            flags = open(flags_file).read().strip()
        else:
            flags = variant_flags(open(logs[0]).readline()) if logs else ""
        by_env = {}
        for run_dir in sorted(glob.glob(os.path.join(variant_dir, "runs", "*__*__*__*"))):
            if not os.path.isdir(run_dir):
                continue
            acc = load_run(run_dir)
            evals, sps = read_run(acc)
            if not evals:
                continue
            env_id, _, seed, _ = os.path.basename(run_dir).rsplit("__", 3)
            tag = "charts/action_saturation"
            sat = [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []
            by_env.setdefault(env_id, []).append((int(seed), evals, sps, sat[-1] if sat else float("nan"), acc))
            plot_actions(variant_dir, run_dir, acc)
        for env_id, seeds in sorted(by_env.items()):
            steps = min(evals[-1][0] for _, evals, *_ in seeds)
            final = [dict(evals)[steps] for _, evals, *_ in seeds if steps in dict(evals)]
            sps = [statistics.median(s[2]) for s in seeds if s[2]]
            rows.append({"variant": variant, "env_id": env_id, "seeds": " ".join(str(s[0]) for s in sorted(seeds)),
                         "steps": steps, "final_mean": mean_std(final)[0], "final_std": mean_std(final)[1],
                         "saturation": statistics.fmean(s[3] for s in seeds),
                         "probe_saturation": statistics.fmean(probe_saturation(s[4]) for s in seeds),
                         "sps": statistics.median(sps) if sps else float("nan"), "flags": flags})  # fmt: skip
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


def summarize(out):
    runs, accumulators = {}, {}
    for run_dir in sorted(glob.glob(os.path.join(out, "runs", "*__*__*__*"))):
        if not os.path.isdir(run_dir):
            continue
        env_id, _, seed, _ = os.path.basename(run_dir).rsplit("__", 3)
        accumulators[run_dir] = load_run(run_dir)
        evals, sps = read_run(accumulators[run_dir])
        if evals:
            runs.setdefault(env_id, {})[int(seed)] = (evals, sps)
    if not runs:
        fail(f"no runs with evaluations under {out}/runs/")
    rows = []
    for env_id, seeds in runs.items():
        final = [evals[-1][1] for evals, _ in seeds.values()]
        best = [max(v for _, v in evals) for evals, _ in seeds.values()]
        sps = [statistics.median(s) for _, s in seeds.values() if s]
        rows.append({
            "env_id": env_id, "seeds": " ".join(map(str, sorted(seeds))),
            "final_mean": mean_std(final)[0], "final_std": mean_std(final)[1],
            "best_mean": mean_std(best)[0], "best_std": mean_std(best)[1],
            "steps": min(evals[-1][0] for evals, _ in seeds.values()),
            "sps": statistics.median(sps) if sps else float("nan"),
        })  # fmt: skip
    write_csv(os.path.join(out, "results.csv"), rows)
    lines = ["| task | seeds | steps | final eval return | best eval return | train steps/s | SAC 500k / 1M "
             "| TD3 500k / 1M |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ref = REFERENCES.get(r["env_id"], {})
        sac, td3 = (" / ".join(map(str, ref[k])) if k in ref else "-" for k in ("SAC", "TD3"))
        lines.append(f"| {r['env_id']} | {r['seeds']} | {r['steps']} | {r['final_mean']:.1f} ± {r['final_std']:.1f} | "
                     f"{r['best_mean']:.1f} ± {r['best_std']:.1f} | {r['sps']:.1f} | {sac} | {td3} |")  # fmt: skip
    lines += ["", "Mean ± std over seeds of the last and the best evaluation (5 episodes each by default).",
              f"References: {SOURCES}.", ""]  # fmt: skip
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    plot(out, runs)
    pictures = [plot_actions(out, run_dir, acc) for run_dir, acc in accumulators.items()]
    print("\n".join(lines))
    print(f"wrote {out}/results.md, {out}/results.csv, {out}/curves.png and {sum(map(bool, pictures))} actions_*.png")


def plot_actions(out, run_dir, acc):
    """The policy's action distribution at the fixed probe state at the run's last evaluation (paper, Figure 4)."""
    tags = sorted((t for t in acc.Tags()["histograms"] if t.startswith("eval/action_dim_")), key=lambda t: int(t[16:]))
    if not tags:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tags), figsize=(max(5.0, 2.2 * len(tags) + 1), 2.4), squeeze=False)
    for ax, tag in zip(axes[0], tags, strict=True):
        event = acc.Histograms(tag)[-1]
        h = event.histogram_value
        # TensorBoard's buckets (lower, limit] are uneven; re-bin them, each at its limit, the one holding the
        # sample's minimum at the minimum (a bucket (-1.009, -0.917] of actions at -1 belongs at -1)
        lower = [-math.inf, *h.bucket_limit[:-1]]
        values = [h.min if lo < h.min <= hi else min(hi, h.max) for lo, hi in zip(lower, h.bucket_limit, strict=True)]
        ax.hist(values, bins=40, range=(-1.0, 1.0), weights=h.bucket)
        ax.set(title=f"action {tag[16:]}", xlim=(-1.05, 1.05), yticks=[])
    name = os.path.basename(run_dir)
    fig.suptitle(f"{name}\n1,000 actions sampled at one initial state, step {event.step}", fontsize=7)
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(runs)
    cols = min(n, 3)
    fig, axes = plt.subplots(math.ceil(n / cols), cols, figsize=(5 * cols, 3.6 * math.ceil(n / cols)), squeeze=False)
    for ax, (env_id, seeds) in zip(axes.flat, sorted(runs.items()), strict=False):
        plot_seeds(ax, [evals for evals, _ in seeds.values()], "C0", f"QSM (this code), {len(seeds)} seed(s)", 0.25)
        for k, (name, (at500k, at1m)) in enumerate(REFERENCES.get(env_id, {}).items()):
            ax.axhline(at500k, color=f"C{k + 1}", linestyle="--", label=f"{name} @500k: {at500k}")
            ax.axhline(at1m, color=f"C{k + 1}", linestyle=":", label=f"{name} @1M: {at1m}")
        ax.set(title=env_id, xlabel="environment steps", ylabel="eval return", ylim=(0, 1000))
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"mean and min-max over seeds; dashed/dotted: {SOURCES}", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=120)


def main(argv):
    opts = parse(argv)
    if opts.summary_only:
        study = not os.path.isdir(os.path.join(opts.summary_only, "runs"))
        (summarize_study if study and glob.glob(os.path.join(opts.summary_only, "*", "runs")) else summarize)(
            opts.summary_only
        )
        sys.exit(0)
    valid = valid_env_ids()
    for env_id in opts.env_ids:
        if env_id not in valid:
            fail(f"--env-ids {env_id!r} is not a dm_control task; valid ids: {', '.join(valid)}")
    tasks = [(env_id, seed) for env_id in opts.env_ids for seed in opts.seeds]
    if opts.slurm:
        script = sbatch_script(opts, tasks)
        if opts.dry_run:
            print(script, end="")
            sys.exit(0)
        os.makedirs(os.path.join(opts.out, "runs"), exist_ok=True)
        path = os.path.join(opts.out, "qsm_array.sbatch")
        with open(path, "w") as f:
            f.write(script)
        if not shutil.which("sbatch"):
            fail(f"sbatch not found: wrote {path}; submit it on the cluster with: sbatch {path}")
        subprocess.run(["sbatch", path], check=True)
        print(f"submitted {path}; when the tasks are done: bash benchmark.sh summary {opts.out}")
        sys.exit(0)
    if opts.dry_run:
        for env_id, seed in tasks:
            print(f"(cd {shlex.quote(opts.out)} && {shlex.join(command(opts, env_id, seed))})")
        sys.exit(0)
    failed = run_local(opts, tasks)
    summarize(opts.out)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
