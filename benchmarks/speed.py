"""`bash benchmark.sh speed`: how fast qsm_continuous.py trains, per task and mode. Measures; asserts nothing.

For each env id and mode, (1) trains the real script in a subprocess for --steps learning-phase steps and reads the
wall times of its TensorBoard loss events, every 100 steps: training steps/s (act + env step + update) is the median
over those windows, the first two dropped as warm-up; (2) times the pieces in this process: updates/s (critic step +
score step) and acting steps/s (one DDPM sample of a single state), medians over windows. Also the time to the first
update (compilation included) and the peak resident memory of the training process. Modes: `eager`, or the
script's flags joined by `+`, `name=value` for a flag with a value: e.g. compile, bf16, cudagraphs (CUDA only),
`compile+best-of-n=16+sampler-clip=x0_hat`. Each mode gets a new, empty torch.compile
cache: the time to the first update is a cold compilation. --repeats N measures every env x mode N times,
round-robin (a machine whose speed drifts slows all alike), and prints medians, the range of the training steps/s,
and each mode's training steps/s over the first mode's in the same round (median ratio). --scripts OLD.py NEW.py
trains each script in every round, side by side (the pieces are timed for this repository's script only), and adds
each script's ratio to the first one's in the same round: the way to compare two versions of the file.
"""

import argparse
import contextlib
import io
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import tyro
from absl import logging as absl_logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import qsm_continuous as qsm  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import events  # noqa: E402
from report import fail  # noqa: E402

LEARNING_STARTS = 500


def mode_flags(mode: str) -> list[str]:
    """A mode as the script's flags: "compile+best-of-n=16" -> ["--compile", "--best-of-n", "16"]; "eager" -> []."""
    tokens = [] if mode == "eager" else mode.split("+")
    return [part for token in tokens for part in (f"--{token}".split("=", 1))]


def mode_args(mode: str, env_id: str, cuda: bool) -> qsm.Args:
    return tyro.cli(qsm.Args, args=[*mode_flags(mode), "--env-id", env_id, "--cuda" if cuda else "--no-cuda"])


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bash benchmark.sh speed", description=__doc__.split("\n")[0])
    parser.add_argument("--env-ids", nargs="+", default=["cheetah-run", "humanoid-walk"])
    parser.add_argument("--modes", nargs="+", help="eager, or the script's flags joined by +, as name or name=value")
    parser.add_argument("--steps", type=int, default=1500, help="learning-phase steps of each training run")
    parser.add_argument("--repeats", type=int, default=1, help="measure every env x mode this many times, round-robin")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--scripts", nargs="+", default=[str(ROOT / "qsm_continuous.py")], help="scripts to compare")
    parser.add_argument("--cuda", action="store_true", help="benchmark on the GPU")
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="QSM against SAC, TD3 and a back-propagated diffusion actor (benchmarks/baselines.py)",
    )
    parser.add_argument("--plot", metavar="PNG", help="--baselines: also plot steps/s against batch and T to PNG")
    opts = parser.parse_args(argv)
    if opts.cuda and not torch.cuda.is_available():
        fail("--cuda was given but torch sees no CUDA device")
    if opts.repeats < 1:
        fail(f"--repeats must be at least 1, got {opts.repeats}")
    if opts.steps < 500:
        fail("--steps must be at least 500 (5 windows of 100 steps, 2 of them warm-up)")
    if opts.cuda:
        default_modes = ["eager", "compile", "cudagraphs", "compile+cudagraphs", "compile+cudagraphs+bf16"]
    else:  # bf16 only where the CPU has bfloat16 matrix instructions (elsewhere it is slower than float32)
        bf16_cpu = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        default_modes = ["eager", "compile"] + (["bf16", "compile+bf16"] if bf16_cpu else [])
    opts.modes = opts.modes or default_modes
    for mode in opts.modes:
        try:  # tyro's own message is a page long: one line instead
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                args = mode_args(mode, "cheetah-run", opts.cuda)
        except SystemExit:
            fail(
                f"--modes {mode!r} is unknown; use eager or the script's flags joined by +, a value after "
                "=, e.g. compile+best-of-n=16"
            )
        if args.cudagraphs and not opts.cuda:
            fail(f"--modes {mode!r} needs --cuda")
    if problem := events.unknown_env_id(opts.env_ids):
        fail(problem)
    for script in opts.scripts:
        if not os.path.isfile(script):
            fail(f"--scripts {script!r}: no such file")
    opts.scripts = [os.path.abspath(script) for script in opts.scripts]
    return opts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_rate(fn, device, windows=7, calls=10) -> float:
    rates = []
    for _ in range(windows):
        sync(device)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync(device)
        rates.append(calls / (time.perf_counter() - start))
    return statistics.median(rates)


def pieces(env_id: str, mode: str, cuda: bool) -> tuple[float, float]:
    """updates/s and acting steps/s of the module's own functions, after warm-up (compilation) calls."""
    torch._dynamo.reset()
    names = ("critic_loss", "qsm_loss", "ddpm_sample")
    eager = {name: getattr(qsm, name) for name in names}
    if "--compile" in mode_flags(mode):  # what --compile does
        for name in names:
            setattr(qsm, name, torch.compile(eager[name]))
    try:
        torch.manual_seed(0)
        args = mode_args(mode, env_id, cuda)
        device = torch.device("cuda" if cuda else "cpu")
        env = qsm.DMCEnv(env_id, seed=0)
        agent = qsm.build_agent(env.obs_dim, env.action_dim, args, device)
        rb = qsm.ReplayBuffer(10_000, env.obs_dim, env.action_dim, device)
        obs = env.reset()
        for _ in range(2000):
            action = torch.rand(env.action_dim).numpy() * 2 - 1
            next_obs, reward, mask, done = env.step(action)
            rb.add(obs, action, reward, next_obs, mask)
            obs = env.reset() if done else next_obs

        def update_fn(idx):
            return qsm.train_step(agent, rb.gather(idx), args)

        def policy(obs):
            return qsm.act(agent, obs, args)

        if args.cudagraphs:
            update_fn, policy = qsm.CudaGraph(update_fn), qsm.CudaGraph(policy)
        obs_t = torch.as_tensor(obs, device=device).unsqueeze(0)

        def update():
            update_fn(rb.sample_indices(args.batch_size))

        def act():
            policy(obs_t)[0].cpu().numpy()

        for _ in range(4):  # compilation, and the graphs' warm-up and capture
            update(), act()
        return median_rate(update, device), median_rate(act, device)
    finally:
        for name, fn in eager.items():
            setattr(qsm, name, fn)


def training(script: str, env_id: str, mode: str, opts) -> tuple[float, float, float]:
    """Trains the script; returns (median training steps/s, s to the first update, peak RSS in MiB)."""
    with tempfile.TemporaryDirectory() as cwd:
        cmd = [sys.executable, script, "--env-id", env_id, "--seed", "1", "--checkpoint-interval", "0"]
        cmd += ["--total-timesteps", str(LEARNING_STARTS + opts.steps), "--learning-starts", str(LEARNING_STARTS)]
        cmd += ["--eval-interval", str(10**9), "--cuda" if opts.cuda else "--no-cuda"]
        cmd += mode_flags(mode)
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": str(opts.threads)}
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            sys.exit(f"error: training run failed ({' '.join(cmd)}):\n{stderr[-2000:]}")
        (run_dir,) = os.listdir(os.path.join(cwd, "runs"))
        acc = events.load_run(os.path.join(cwd, "runs", run_dir))
        losses = acc.Scalars("losses/qf1_loss")  # with their wall times
        windows = [(b.step - a.step) / (b.wall_time - a.wall_time) for a, b in itertools.pairwise(losses)]
        started = acc.Scalars("charts/actor_lr")[0].wall_time  # logged right after the first update
        first_update = started - acc.Tensors("hyperparameters/text_summary")[0].wall_time
        return statistics.median(windows[2:]), first_update, usage.ru_maxrss / 1024


def main(argv=None) -> None:
    opts = parse(argv)
    absl_logging.set_verbosity(absl_logging.ERROR)  # dm_control's deprecation chatter
    torch.set_num_threads(opts.threads)
    name = torch.cuda.get_device_name() if opts.cuda else f"CPU, {opts.threads} torch threads"
    if opts.baselines:
        import baselines

        print(f"device: {name}; torch {torch.__version__}; eager float32; one update = what each method does per step")
        for env_id in opts.env_ids:
            baselines.compare(env_id, opts.repeats, torch.device("cuda" if opts.cuda else "cpu"), opts.plot)
        return
    print(f"device: {name}; torch {torch.__version__}; defaults (T=5, 512x512 networks, batch 256)")
    print(f"training runs: {opts.steps} learning-phase steps after {LEARNING_STARTS} random ones; medians of windows")
    labels = {script: os.path.relpath(script) for script in opts.scripts}
    runs = {}  # (script, env id, mode) -> per round: (train steps/s, updates/s, act steps/s, s to 1st update, RSS)
    for round_ in range(opts.repeats):
        for env_id in opts.env_ids:
            for mode in opts.modes:
                for script in opts.scripts:
                    # a new, empty compile cache: the training run compiles cold, pieces() reuses the cache
                    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache = tempfile.mkdtemp(prefix="qsm-inductor-")
                    try:
                        train_sps, first_update, rss = training(script, env_id, mode, opts)
                        own = script == str(ROOT / "qsm_continuous.py")
                        updates, acts = pieces(env_id, mode, opts.cuda) if own else (float("nan"), float("nan"))
                    finally:
                        shutil.rmtree(cache, ignore_errors=True)
                    runs.setdefault((script, env_id, mode), []).append((train_sps, updates, acts, first_update, rss))
                    print(
                        f"round {round_ + 1}/{opts.repeats}: {labels[script]} {env_id} {mode}: {train_sps:.1f} "
                        "train steps/s",
                        file=sys.stderr,
                        flush=True,
                    )
    print_table(runs, opts, labels)


def print_table(runs: dict, opts, labels: dict) -> None:
    if opts.repeats > 1:
        print(f"each figure: the median of {opts.repeats} rounds; train steps/s also its range over the rounds")
    base, first = opts.modes[0], opts.scripts[0]  # the reference mode and script
    header = "| script | env | mode | train steps/s | updates/s | act steps/s | s to 1st update | peak RSS MiB |"
    header += f" vs {base} |"
    header += f" vs {labels[first]} |" if len(opts.scripts) > 1 else ""
    print("\n" + header + "\n|" + "---|" * (header.count("|") - 1))
    for (script, env_id, mode), rounds in runs.items():
        train, updates, acts, first_update, rss = (statistics.median(column) for column in zip(*rounds, strict=True))
        spread = f" ({min(r[0] for r in rounds):.1f}-{max(r[0] for r in rounds):.1f})" if opts.repeats > 1 else ""
        row = f"| {labels[script]} | {env_id} | {mode} | {train:.1f}{spread} | {updates:.1f} | {acts:.0f} | "
        row += f"{first_update:.1f} | {rss:.0f} |"
        # each round's ratio to the reference in the same round, then the median: drift between rounds cancels
        references = [runs[script, env_id, base]]
        if len(opts.scripts) > 1:
            references.append(runs[first, env_id, mode])
        for reference in references:
            row += f" {statistics.median(r[0] / e[0] for r, e in zip(rounds, reference, strict=True)):.2f}x |"
        print(row.replace("nan", "-"))


if __name__ == "__main__":
    main()
