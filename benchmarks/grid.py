"""`bash benchmark.sh [grid]` and `bash benchmark.sh summary DIR`: the command line of a grid or a study.

grid (the default): trains qsm_continuous.py for every env id x seed (defaults: the paper's six DMC tasks, seeds
1 2 3), FLAGS (everything after --) passed to every run, into DIR/runs/ (default DIR: runs/benchmark); with --variants
NAME[=FLAGS] ..., every variant too, into DIR/NAME/runs/. Checks the input before anything starts; launch.py starts the
tasks (locally --workers at a time, or as a Slurm array with --slurm; --dry-run prints the commands or the array
script) and owns the rule of what a task resumes; then report.py summarises them.
summary: report.py's summary of DIR (a grid: DIR/runs/) or of a study (DIR/VARIANT/runs/).
"""

import argparse
import contextlib
import glob
import io
import os
import re
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import events  # noqa: E402
import launch  # noqa: E402
import report  # noqa: E402
from report import fail  # noqa: E402

SCRIPT = os.path.join(ROOT, "qsm_continuous.py")
PAPER_TASKS = ["cheetah-run", "walker-walk", "walker-run", "hopper-hop", "quadruped-walk", "humanoid-walk"]


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


def main(argv):
    opts = parse(argv)
    if opts.summary_only:
        study = not os.path.isdir(os.path.join(opts.summary_only, "runs"))
        study = study and glob.glob(os.path.join(opts.summary_only, "*", "runs"))  # DIR/VARIANT/runs/
        (report.summarize_study if study else report.summarize)(opts.summary_only)
        sys.exit(0)
    if problem := events.unknown_env_id(opts.env_ids):
        fail(problem)
    tasks = tasks_of(opts)
    for task in {(task.script, task.flags): task for task in tasks}.values():  # each variant's flags, parsed
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                launch.task_args(task)
        except SystemExit:
            fail(f"{shlex.join(task.flags)}: not flags of {os.path.relpath(task.script)} (its --help lists them)")
    if problem := launch.conflicts(tasks):  # before anything starts
        fail(problem)
    if opts.variants and not opts.dry_run:  # the order, for the summary: the first variant is the baseline
        os.makedirs(opts.out, exist_ok=True)
        with open(os.path.join(opts.out, "variants.txt"), "w") as f:
            f.write("\n".join(variants(opts)) + "\n")
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
            fail(
                f"sbatch not found: wrote {path}; on the cluster, from an activated venv: sbatch {path} (its first "
                "lines say how to point it at the checkout there)"
            )
        # QSM_PYTHON: the tasks run this Python (sbatch passes the environment on), whatever the node's PATH
        subprocess.run(["sbatch", path], check=True, env={"QSM_PYTHON": sys.executable, **os.environ})
        print(f"submitted {path}; when the tasks are done: bash benchmark.sh summary {opts.out}")
        sys.exit(0)
    if opts.dry_run:  # what each task would run now
        for task in tasks:
            resume, _ = launch.own_run(task, launch.task_args(task))
            print(launch.pasteable(task, launch.command(task, resume)))
        sys.exit(0)
    failed = launch.run_local(tasks, opts.workers)
    (report.summarize_study if opts.variants else report.summarize)(opts.out)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
