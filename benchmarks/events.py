"""Reading runs: what qsm_continuous.py wrote to a run directory's TensorBoard event files, as plain Python values.

The one reader of event files in the repository: the summaries (report.py), the speed benchmark and the tests read
runs through it. A run directory is runs/{env_id}__{exp_name}__{seed}__{time}[-n]; `run_dirs` lists a grid's.
"""

import dataclasses
import glob
import hashlib
import math
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_dirs(grid_dir):
    """(run_dir, env_id, seed) for every run directory in grid_dir/runs/, named {env_id}__{exp_name}__{seed}__{time}."""
    for run_dir in sorted(glob.glob(os.path.join(grid_dir, "runs", "*__*__*__*"))):
        if os.path.isdir(run_dir):
            env_id, _, seed, _ = os.path.basename(run_dir).rsplit("__", 3)
            yield run_dir, env_id, int(seed)


def load_run(run_dir):
    """The run's TensorBoard files, read once (scalars, histograms and texts, nothing dropped): an EventAccumulator,
    whose events also carry their wall times."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalar(acc, tag):
    """[(step, value)] of one scalar tag; [] for a tag the run never logged."""
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def all_scalars(acc):
    """{tag: [(step, value)]} of every scalar tag."""
    return {tag: scalar(acc, tag) for tag in acc.Tags()["scalars"]}


def texts(acc, tag):
    """[(step, text)] of one text tag (the `hyperparameters` table, each attempt's `machine`); [] if never logged."""
    name = f"{tag}/text_summary"
    if name not in acc.Tags()["tensors"]:
        return []
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(name)]


def machine(acc):
    """The run's cores and threads as `CxT` from the last attempt's `machine` text ("?" for runs before it)."""
    logged = texts(acc, "machine")
    if not logged:
        return "?"
    cores, threads = (int(word) for word in logged[-1][1].split(": ")[-1].split() if word.isdigit())
    return f"{cores}x{threads}"


def script_copy(run_dir):
    """(file name, text, short sha256) of the copy of its script that a run keeps; (None, None, None) without one."""
    copies = sorted(glob.glob(os.path.join(glob.escape(str(run_dir)), "*.py")))
    if not copies:
        return None, None, None
    with open(copies[0], "rb") as f:
        data = f.read()
    return os.path.basename(copies[0]), data.decode(), hashlib.sha256(data).hexdigest()[:8]


def recorded_args(acc):
    """{field: value as text} of the run's `hyperparameters` table (its arguments when it started); {} without it."""
    table = texts(acc, "hyperparameters")
    return dict(row.strip("|").split("|", 1) for row in table[0][1].splitlines()[2:]) if table else {}


def histogram_points(h):
    """A TensorBoard histogram as (values, counts): the probe's 0.01-wide buckets at their centres; TensorBoard's
    default uneven buckets (runs before 8b38e17) at their limits, the one holding the minimum at the minimum."""
    limits, counts = np.array(h.bucket_limit), np.array(h.bucket, dtype=float)
    if len(limits) > 1 and np.allclose(np.diff(limits), 0.01, atol=1e-6):
        return limits - 0.005, counts
    lower = [-math.inf, *limits[:-1]]  # bucket i holds (lower_i, limit_i]: (-1.009, -0.917] of actions at -1 is at -1
    values = [h.min if lo < h.min <= hi else min(hi, h.max) for lo, hi in zip(lower, limits, strict=True)]
    return np.array(values), counts


def probe(acc):
    """The probe state's sampled actions at the run's last evaluation: (its step, one (values, counts) per action
    component in component order); (None, []) for a run without them."""
    tags = sorted((t for t in acc.Tags()["histograms"] if t.startswith("eval/action_dim_")), key=lambda t: int(t[16:]))
    events = [acc.Histograms(tag)[-1] for tag in tags]
    return (events[-1].step if events else None), [histogram_points(e.histogram_value) for e in events]


def script():
    """qsm_continuous imported (it imports dm_control: only when needed), or one line."""
    if ROOT not in sys.path:  # once: the summary asks for the script per task
        sys.path.insert(0, ROOT)
    try:
        import qsm_continuous
    except ImportError as error:
        sys.exit(f"error: {error}: activate the project's environment (README, Setup: pip install -r requirements.txt)")
    return qsm_continuous


def unknown_env_id(env_ids):
    """The script's one-line error for the first of env_ids that is not one of its tasks, or None when all are."""
    for env_id in env_ids:
        if problem := script().env_id_problem(env_id):
            return problem.replace("--env-id ", "--env-ids ", 1)
    return None


def recorded_flags(acc, args_type, same_experiment):
    """The flags of a run as its event file records its arguments (the `hyperparameters` text of a new run) that
    differ from args_type's defaults, in the script's field order, without the ones in same_experiment (those a
    resume may change, the env id and the seed); None for a run without the record."""
    recorded = recorded_args(acc)
    if not recorded:
        return None
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
