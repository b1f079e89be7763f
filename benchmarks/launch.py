"""Starting the grid's runs, locally or as a Slurm array, with one rule for what a task resumes.

A task is (OUT, SCRIPT, ENV_ID, SEED, FLAGS). `python benchmarks/launch.py run OUT SCRIPT ENV_ID SEED FLAGS...` starts
one, and both the local pool (run_local) and the Slurm array (benchmarks/array.sbatch, filled in by sbatch_script)
start every task that way, so the two cannot drift apart. In OUT it appends to runs/{ENV_ID}__seed{SEED}.log (every
attempt's lines kept), writes the command as the attempt's first line, and runs SCRIPT: with --resume of the run in
OUT/runs that is this very experiment, when there is one with a checkpoint, else as a new run. The same experiment
(`compare`): the run's copy of its script (qsm_continuous.py keeps one in every run directory) equal to SCRIPT byte for
byte, and the same env id, seed and flags but those a resume may change (the script's RUN_FIELDS, e.g.
--total-timesteps). A run already at its last step is left as it is. Another experiment's run is never resumed: the
grid refuses, before it starts anything, an OUT that holds one for the same task and seed (`conflicts`). A task's
status is its run's: 0 at its last step, 130 or 143 when a signal stopped it before (resumable), else failed.
"""

import dataclasses
import filecmp
import functools
import glob
import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.abspath(__file__)
# a run stopped by SIGINT or SIGTERM exits 128 + the signal after its checkpoint (-signal: killed by it, the last
# checkpoint whole): it resumes from there
STOPPED = (130, 143, -2, -15)
ENVIRONMENT = dict(os.environ)  # as given: importing the script sets MUJOCO_GL, which the run must choose itself


@dataclasses.dataclass(frozen=True)
class Task:
    out: str  # the grid (or the study variant's) directory: runs go to OUT/runs/
    script: str  # absolute path of qsm_continuous.py or a copy of it
    env_id: str
    seed: int
    flags: tuple[str, ...]  # the script's flags shared by the task's grid


@functools.cache
def script_module(script):
    """The script imported as a module (its Args and RUN_FIELDS), once per script."""
    spec = importlib.util.spec_from_file_location(f"launched_{abs(hash(script))}", script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # registered: tyro reads its source
    spec.loader.exec_module(module)
    return module


def task_args(task):
    """The task's arguments as the script would parse them."""
    import tyro

    qsm = script_module(task.script)
    return tyro.cli(qsm.Args, args=[*task.flags, "--env-id", task.env_id, "--seed", str(task.seed)])


def shown(value):
    return " ".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


def compare(run_dir, task, args):
    """(what makes run_dir another experiment than the task, one phrase each: [] for the same one; its checkpoint's
    step, None without a checkpoint)."""
    import torch

    checkpoint = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(checkpoint):
        return [], None
    copy = os.path.join(run_dir, os.path.basename(task.script))
    if os.path.exists(copy) and not filecmp.cmp(copy, task.script, shallow=False):
        return [f"made by another {os.path.basename(task.script)} than {os.path.relpath(task.script)}"], None
    if not os.path.exists(copy):  # the run keeps a copy of the script that made it: name that one
        made_by = sorted(name for name in os.listdir(run_dir) if name.endswith(".py")) or ["an unknown script"]
        return [f"made by {made_by[0]} there, {os.path.relpath(task.script)} here"], None
    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)  # mmap: the buffer stays unread
    saved, ignore = state["args"], script_module(task.script).RUN_FIELDS
    differ = [name for name, value in vars(args).items() if name not in ignore and saved.get(name) != value]
    flags = [
        f"--{name.replace('_', '-')} {shown(saved.get(name))} there, {shown(vars(args)[name])} here" for name in differ
    ]
    return flags, state["global_step"]


def candidates(task, args, any_script=False):
    """The task's run directories in OUT/runs, newest first (of any script with any_script)."""
    exp_name = "*" if any_script else glob.escape(args.exp_name)
    pattern = os.path.join(glob.escape(task.out), "runs", f"{task.env_id}__{exp_name}__{task.seed}__*")
    return sorted((d for d in glob.glob(pattern) if os.path.isdir(d)), key=os.path.getmtime, reverse=True)


def own_run(task, args):
    """(the run directory of this very experiment that has a checkpoint, its step), or (None, None)."""
    for run_dir in candidates(task, args):
        differences, step = compare(run_dir, task, args)
        if step is not None and not differences:
            return run_dir, step
    return None, None


def conflicts(tasks):
    """One line for the first run in a task's OUT that is another experiment of the same env id and seed, or None."""
    for task in tasks:
        args = task_args(task)
        for run_dir in candidates(task, args, any_script=True):
            differences, _ = compare(run_dir, task, args)
            if differences:
                return (
                    f"{run_dir} is another experiment ({'; '.join(differences)}): a grid directory holds one "
                    "experiment; give this one another --out, or run both as --variants of one study"
                )
    return None


def command(task, resume=None):
    """The script's command line for the task, run in OUT, resuming the run directory `resume` if given."""
    resume_args = ["--resume", os.path.relpath(resume, task.out)] if resume else []
    return [sys.executable, task.script, "--env-id", task.env_id, "--seed", str(task.seed), *resume_args, *task.flags]


def logged(cmd):
    """The command as run logs record it: the script relative to the repository, Python as `python`."""
    return shlex.join(["python", os.path.relpath(cmd[1], ROOT), *cmd[2:]])


def pasteable(task, cmd):
    """The command as --dry-run prints it, to run when pasted where the user stands: into OUT (made if new), the
    script by its absolute path."""
    out = shlex.quote(os.path.relpath(task.out))
    return f"(mkdir -p {out} && cd {out} && {shlex.join(['python', *cmd[1:]])})"


def log_path(task):
    return os.path.join(task.out, "runs", f"{task.env_id}__seed{task.seed}.log")


def run(task):
    """One task: its own run resumed (or left alone when at its last step) or a new one; its output to its log."""
    args = task_args(task)
    resume, step = own_run(task, args)
    os.makedirs(os.path.join(task.out, "runs"), exist_ok=True)
    log = os.open(log_path(task), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if resume and step >= args.total_timesteps:
        os.write(log, f"{os.path.relpath(resume, task.out)} is at step {step}, its last: nothing to do\n".encode())
        sys.exit(0)
    cmd = command(task, resume)
    where = f"cores {sorted(os.sched_getaffinity(0))} on {socket.gethostname()}"
    if "SLURM_ARRAY_TASK_ID" in os.environ:  # its Slurm log: OUT/slurm-JOB_TASK.log
        where += f", Slurm task {os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    os.write(log, f"$ {logged(cmd)}  # {where}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    os.chdir(task.out)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.execve(sys.executable, cmd, ENVIRONMENT)


def run_local(tasks, workers, cores=None):
    """Runs the tasks, `workers` at a time, each pinned to its own share of the cores. One thread starts and reaps
    every run (pinning in preexec_fn is safe only in a process without other threads). Returns the failures.
    SIGINT or SIGTERM to the pool (Ctrl-C, kill, timeout) starts no more runs and passes one SIGTERM to each running
    one (in its own session, so the terminal's Ctrl-C reaches it only this way: a second signal would stop it at once,
    without its checkpoint); when they have checkpointed, the pool exits 128 + the signal."""
    cores = sorted(cores or os.sched_getaffinity(0))
    workers = min(workers, len(tasks))
    share = max(1, len(cores) // workers)
    free = [cores[i * share : (i + 1) * share] or cores for i in range(workers)]  # one core set per worker
    threads = os.environ.get("OMP_NUM_THREADS")  # the user's, never overridden; else one per core of a run's share
    said = f"{threads} thread(s) each (OMP_NUM_THREADS)" if threads else f"{share} thread(s) each (set OMP_NUM_THREADS)"
    print(
        f"{len(tasks)} runs, {workers} at a time, {share} core(s) and {said}; logs in OUT/runs/ENV__seedN.log",
        flush=True,
    )
    pending, running, failed, stop, passed_on = list(tasks), [], 0, [], False

    def on_signal(signum, _):  # Ctrl-C, kill, timeout: no run starts; each running one gets a SIGTERM (below)
        stop.append(signum)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    while (pending and not stop) or running:
        while pending and free and not stop:
            task, my_cores = pending.pop(0), free.pop()
            os.makedirs(os.path.join(task.out, "runs"), exist_ok=True)
            own = threads or str(len(my_cores))
            env = {**ENVIRONMENT, "OMP_NUM_THREADS": own, "MKL_NUM_THREADS": own, "TQDM_DISABLE": "1"}
            proc = subprocess.Popen(
                [sys.executable, LAUNCH, "run", *task_argv(task)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=lambda cores=my_cores: os.sched_setaffinity(0, cores),
                start_new_session=True,
            )
            running.append((proc, task, my_cores, time.time()))
        if stop and not passed_on:  # after the last start, so that every running run gets it, once
            for proc, *_ in running:
                proc.send_signal(signal.SIGTERM)
            passed_on = True
        time.sleep(1.0)
        for item in [item for item in running if item[0].poll() is not None]:
            proc, task, my_cores, start = item
            running.remove(item)
            free.append(my_cores)
            if proc.returncode == 0:
                status = "done"
            elif proc.returncode in STOPPED:
                status = "stopped by a signal; run the same command again to resume it"
            else:
                status = f"FAILED (status {proc.returncode}, see {log_path(task)})"
            failed += proc.returncode != 0
            name = os.path.relpath(task.out)
            print(f"{name}: {task.env_id} seed {task.seed}: {status} in {time.time() - start:.0f} s", flush=True)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    if stop:
        print(
            f"{signal.Signals(stop[0]).name}: the grid stopped ({len(pending)} runs not started); run the same "
            "command again to resume it",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + stop[0])
    return failed


def task_argv(task):
    return [task.out, task.script, task.env_id, str(task.seed), *task.flags]


TEMPLATE = os.path.join(ROOT, "benchmarks", "array.sbatch")


def slurm_seconds(time_limit):
    """Slurm's --time (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS) in seconds; None for another form."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time_limit)
    if not match:
        return None
    days, *numbers = match.groups()
    numbers = [int(n) for n in numbers if n is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        hours, minutes, seconds = numbers + [0] * (3 - len(numbers))
    elif len(numbers) == 3:  # HH:MM:SS
        hours, minutes, seconds = numbers
    else:  # MM[:SS]
        hours, (minutes, seconds) = 0, numbers + [0] * (2 - len(numbers))
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def in_repo(path):
    """An absolute path as the array script names it: relative to the repository when inside it (portable)."""
    inside = os.path.commonpath([path, ROOT]) == ROOT
    return os.path.relpath(path, ROOT) if inside else path


def sbatch_script(tasks, out, cpus, time_limit=None):
    """benchmarks/array.sbatch filled in: one array task per Task, run in the repository (--chdir)."""
    log = f"{in_repo(os.path.abspath(out))}/slurm-%A_%a.log"  # Slurm's lines and the array script's
    options = [
        "--job-name=qsm",
        f"--array=0-{len(tasks) - 1}",
        f"--cpus-per-task={cpus}",
        f"--chdir={ROOT}",
        f"--output={log}",
        "--open-mode=append",
        "--requeue",
    ]
    if time_limit:  # USR1 ahead of the limit: 2 minutes, at most half of it, for the last step and the checkpoint
        options += [f"--time={time_limit}", f"--signal=B:USR1@{min(120, slurm_seconds(time_limit) // 2)}"]
    if any("--cuda" in task.flags for task in tasks):
        options.append("--gres=gpu:1")
    lines = [[in_repo(t.out), in_repo(t.script), t.env_id, str(t.seed), *t.flags] for t in tasks]
    values = {
        "options": "\n".join(f"#SBATCH {option}" for option in options),
        "tasks": "\n".join(shlex.quote(shlex.join(line)) for line in lines),
    }
    with open(TEMPLATE) as f:
        return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m[1]], f.read())


if __name__ == "__main__":
    if len(sys.argv) < 6 or sys.argv[1] != "run":
        sys.exit("usage: python benchmarks/launch.py run OUT SCRIPT ENV_ID SEED [FLAGS...]")
    out, script, env_id, seed, *flags = sys.argv[2:]
    run(Task(os.path.abspath(out), os.path.abspath(script), env_id, int(seed), tuple(flags)))
