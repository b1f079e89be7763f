#!/usr/bin/env bash
# Benchmarks of qsm_continuous.py; the Python lives in benchmarks/ (their docstrings say what each one measures).
#
#   bash benchmark.sh [--env-ids ID ...] [--seeds N ...] [--variants NAME[=FLAGS] ...] [--workers N] [--out DIR]
#                     [--slurm] [--cpus-per-task N] [--time LIMIT] [--dry-run] [-- FLAGS]
#   bash benchmark.sh summary DIR
#   bash benchmark.sh saturation [--capacity]
#   bash benchmark.sh random-policy [--env-ids ID ...] [--seeds N ...] [--episodes N]
#   bash benchmark.sh bundle DIR [--python-version 3.12]
#   bash benchmark.sh gpu-check [--bundle DIR] [--report FILE]
#   bash benchmark.sh speed [--env-ids ID ...] [--modes MODE ...] [--steps N] [--repeats N] [--threads N]
#                           [--scripts A.py B.py] [--cuda] [--baselines [--plot PNG]]
#
# grid (the default): trains every env id x seed (default: the paper's six tasks, seeds 1 2 3) into DIR/runs/, locally
# or as a Slurm array (--slurm: benchmarks/array.sbatch filled in, --cpus-per-task per task, a GPU for --cuda flags,
# --time: a time limit, USR1 ahead of it, the task requeues itself until its run is done); then the summary
# (benchmarks/grid.py). A task's status is its run's: 0 done, 143/130 stopped by a signal (resume it), else failed.
# Each run gets OMP_NUM_THREADS threads if it is set, else one per core of its share. Bad input: one line, exit 2.
# Ctrl-C or SIGTERM to a local grid: no more runs start, the running ones checkpoint, exit 130/143 (rerun to resume).
# Each task resumes its own run in DIR, the same script and flags (bar --total-timesteps and the like), or starts it
# (benchmarks/launch.py); a DIR holding another experiment's run of a task is refused before anything starts.
# A study in one call: --variants paper "mq120=--M-q 120" "mine=copy.py --T 10" trains each variant, its FLAGS (led by
# a copy of the script, or not) before the shared ones after --, into DIR/NAME/runs/; the summary compares them.
# summary: DIR/results.md, results.csv, curves.png and actions_{run}.png from the runs' TensorBoard files.
# speed: training steps/s, updates/s, acting steps/s, time to the first update and peak memory per task and mode,
# round-robin over --repeats rounds, with ratios measured within a round (benchmarks/speed.py). --baselines: QSM
# against SAC, TD3 and a diffusion actor back-propagated through the chain, per batch and T (benchmarks/baselines.py).
# bundle: a folder of wheels (< 64 MiB) that installs the script's packages on an offline CUDA machine with torch.
# gpu-check: the CUDA tests, the recommended GPU mode with a resume, a headless frame and the GPU speed modes.
# saturation: why QSM policies sit on the action bounds, on a 1-D toy with a known critic (benchmarks/saturation.py);
# --capacity: the same toy at seven denoiser sizes.
# random-policy: uniform random actions on a run's own evaluation episodes, the baseline of a task (pendulum).
set -euo pipefail
here=$(dirname "$0") # paths given (--out DIR, summary DIR) stay relative to where the user stands

case "${1:-}" in
speed) shift && exec python "$here/benchmarks/speed.py" "$@" ;;
summary) shift && exec python "$here/benchmarks/grid.py" --summary-only "$@" ;;
saturation) shift && exec python "$here/benchmarks/saturation.py" "$@" ;;
random-policy) shift && exec python "$here/benchmarks/random_policy.py" "$@" ;;
bundle) shift && exec python "$here/benchmarks/bundle.py" "$@" ;;
gpu-check) shift && exec bash "$here/benchmarks/gpu_check.sh" "$@" ;;
-h | --help | help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//' ;;
*) exec python "$here/benchmarks/grid.py" "$@" ;;
esac
