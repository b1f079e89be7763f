#!/usr/bin/env bash
# Benchmarks of qsm_continuous.py. Measures; asserts nothing.
#
#   bash benchmark.sh speed [--env-ids ID ...] [--modes MODE ...] [--steps N] [--threads N] [--cuda]
#
# modes: `eager`, or the script's speed flags joined by `+`: compile, bf16, cudagraphs (CUDA only), e.g.
# compile+cudagraphs+bf16. Default: eager compile bf16 compile+bf16, and with --cuda also cudagraphs,
# compile+cudagraphs and compile+cudagraphs+bf16.
# speed: for each env id and mode, (1) trains the real script in a subprocess for --steps learning-phase steps and
# reads the wall times of its TensorBoard loss events, every 100 steps: training steps/s (act + env step + update) is
# the median over those windows, the first two dropped as warm-up; (2) times the pieces in this process: updates/s
# (critic step + score step) and acting steps/s (one DDPM sample of a single state), medians over windows. Also the
# time to the first update (compilation included) and the peak resident memory of the training process.
set -euo pipefail
cd "$(dirname "$0")"

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }

case "${1:-}" in
speed)
    shift
    exec python - "$@" <<'PY'
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from absl import logging as absl_logging

absl_logging.set_verbosity(absl_logging.ERROR)  # dm_control's deprecation chatter
sys.path.insert(0, os.getcwd())
import qsm_continuous as qsm  # noqa: E402

parser = argparse.ArgumentParser(prog="bash benchmark.sh speed")
parser.add_argument("--env-ids", nargs="+", default=["cheetah-run", "humanoid-walk"])
parser.add_argument("--modes", nargs="+", help="eager, or flags joined by +: compile, bf16, cudagraphs")
parser.add_argument("--steps", type=int, default=1500, help="learning-phase steps of each training run")
parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
parser.add_argument("--cuda", action="store_true", help="benchmark on the GPU")
opts = parser.parse_args()
if opts.cuda and not torch.cuda.is_available():
    sys.exit("error: --cuda was given but torch sees no CUDA device")
if opts.steps < 500:
    sys.exit("error: --steps must be at least 500 (5 windows of 100 steps, 2 of them warm-up)")
opts.modes = opts.modes or ["eager", "compile", "bf16", "compile+bf16"] + (
    ["cudagraphs", "compile+cudagraphs", "compile+cudagraphs+bf16"] if opts.cuda else []
)
for mode in opts.modes:
    if mode != "eager" and not set(mode.split("+")) <= {"compile", "bf16", "cudagraphs"}:
        sys.exit(f"error: --modes {mode!r} is unknown; use eager or flags joined by +: compile, bf16, cudagraphs")
    if "cudagraphs" in mode and not opts.cuda:
        sys.exit(f"error: --modes {mode!r} needs --cuda")
for env_id in opts.env_ids:
    if env_id not in qsm.ENV_IDS:
        sys.exit(f"error: --env-ids {env_id!r} is not a dm_control task; valid ids: {', '.join(qsm.ENV_IDS)}")
torch.set_num_threads(opts.threads)
device = torch.device("cuda" if opts.cuda else "cpu")
LEARNING_STARTS = 500


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_rate(fn, items_per_call, windows=7, calls=10):
    rates = []
    for _ in range(windows):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        rates.append(items_per_call * calls / (time.perf_counter() - start))
    return statistics.median(rates)


def pieces(env_id, mode):
    """updates/s and acting steps/s of the module's own functions, after a warm-up (compilation) call."""
    torch._dynamo.reset()
    names = ("critic_loss", "qsm_loss", "ddpm_sample")
    eager = {name: getattr(qsm, name) for name in names}
    if "compile" in mode:
        for name in names:
            setattr(qsm, name, torch.compile(eager[name]))
    try:
        torch.manual_seed(0)
        args = qsm.Args(env_id=env_id, cuda=opts.cuda, cudagraphs="cudagraphs" in mode, bf16="bf16" in mode)
        env = qsm.DMCEnv(env_id, seed=0)
        S, A = env.obs_dim, env.action_dim
        critic, target, den, copt, aopt, _ = qsm.build_agent(S, A, args, device)
        schedule = qsm.DiffusionSchedule("vp", args.T, device)
        rb = qsm.ReplayBuffer(10_000, S, A, device)
        obs = env.reset()
        for _ in range(2000):
            action = torch.rand(A).numpy() * 2 - 1
            next_obs, reward, mask, done = env.step(action)
            rb.add(obs, action, reward, next_obs, mask)
            obs = env.reset() if done else next_obs

        def update_fn(idx):
            return qsm.train_step(rb.gather(idx), critic, target, den, copt, aopt, schedule, args)

        def policy(obs):
            return qsm.act(den, schedule, obs, args)

        if args.cudagraphs:
            update_fn, policy = qsm.CudaGraph(update_fn), qsm.CudaGraph(policy)
        obs_t = torch.as_tensor(obs, device=device).unsqueeze(0)

        def update():
            update_fn(rb.sample_indices(args.batch_size))

        def act():
            policy(obs_t)[0].cpu().numpy()

        for _ in range(4):  # compilation, and the graphs' warm-up and capture
            update(), act()
        return median_rate(update, 1), median_rate(act, 1)
    finally:
        for name, fn in eager.items():
            setattr(qsm, name, fn)


def training(env_id, mode):
    """Trains the real script; returns (median training steps/s, s to the first update, peak RSS in MiB)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, os.path.abspath("qsm_continuous.py"), "--env-id", env_id, "--seed", "1"]
        cmd += ["--total-timesteps", str(LEARNING_STARTS + opts.steps), "--learning-starts", str(LEARNING_STARTS)]
        cmd += ["--eval-interval", str(10**9), "--cuda" if opts.cuda else "--no-cuda"]
        cmd += [f"--{flag}" for flag in mode.split("+") if flag != "eager"]
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(opts.threads)}
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            sys.exit(f"error: training run failed ({' '.join(cmd)}):\n{stderr[-2000:]}")
        (run_dir,) = os.listdir(os.path.join(cwd, "runs"))
        acc = EventAccumulator(os.path.join(cwd, "runs", run_dir), size_guidance={"scalars": 0})
        acc.Reload()
        events = acc.Scalars("losses/qf1_loss")
        windows = [
            (b.step - a.step) / (b.wall_time - a.wall_time) for a, b in zip(events[:-1], events[1:], strict=True)
        ]
        started = acc.Scalars("charts/actor_lr")[0].wall_time  # logged right after the first update
        first_update = started - acc.Tensors("hyperparameters/text_summary")[0].wall_time
        return statistics.median(windows[2:]), first_update, usage.ru_maxrss / 1024


name = torch.cuda.get_device_name() if opts.cuda else f"CPU, {opts.threads} torch threads"
print(f"device: {name}; torch {torch.__version__}; defaults (T=5, 512x512 networks, batch 256)")
print(f"training runs: {opts.steps} learning-phase steps after {LEARNING_STARTS} random ones; medians of windows\n")
header = "| env | mode | train steps/s | updates/s | act steps/s | s to 1st update | peak RSS MiB |"
print(header + "\n|" + "---|" * (header.count("|") - 1))
for env_id in opts.env_ids:
    for mode in opts.modes:
        train_sps, first_update, rss = training(env_id, mode)
        updates, acts = pieces(env_id, mode)
        print(f"| {env_id} | {mode} | {train_sps:.1f} | {updates:.1f} | {acts:.0f} | {first_update:.1f} | {rss:.0f} |")
        sys.stdout.flush()
PY
    ;;
-h | --help | help)
    usage
    ;;
*)
    usage >&2
    exit 2
    ;;
esac
