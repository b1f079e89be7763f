#!/usr/bin/env bash
# `bash benchmark.sh gpu-check [--bundle DIR] [--report FILE]`: is this GPU machine ready for qsm_continuous.py?
# Installs the offline bundle first when given one (`bash benchmark.sh bundle DIR` made it), then runs, each step's
# output in a log beside the report: the CUDA tests; the recommended mode (--compile --cudagraphs --bf16
# --best-of-n 4) for 2,000 steps, then a --resume of that run to 3,000; one frame rendered headless (EGL); the speed
# table's GPU modes on cheetah-run. Prints one line per step (pass/FAIL, seconds) and the speed table; exit 1 if any
# step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle="" report="runs/gpu-check/report.txt"
while [ $# -gt 0 ]; do
    case "$1" in
    --bundle) bundle=$2 && shift 2 ;;
    --report) report=$2 && shift 2 ;;
    *) echo "error: unknown argument $1; usage: bash benchmark.sh gpu-check [--bundle DIR] [--report FILE]" && exit 2 ;;
    esac
done
if [ -n "$bundle" ] && ! python -m pip install -q --no-index --no-deps --find-links "$bundle" -r "$bundle/requirements.txt"; then
    echo "error: the bundle $bundle did not install (Python $(python -V 2>&1)): build it for this Python" && exit 2
fi
python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null ||
    { echo "error: torch sees no CUDA device: nothing to check" && exit 2; }
logs=$(dirname "$report") && mkdir -p "$logs" && : >"$report"
export MUJOCO_GL=egl TQDM_DISABLE=1
failed=0
step() { # step NAME COMMAND...: runs it, its output in $logs/NAME.log, one line in the report
    local name=$1 start=$SECONDS status=pass && shift
    "$@" >"$logs/$name.log" 2>&1 || { status=FAIL && failed=1; }
    echo "$name: $status ($((SECONDS - start)) s)" | tee -a "$report"
}
run_and_resume() { # the run, then its resume; passes when the resumed run evaluates at its last step
    local work root=$PWD flags=(--env-id cheetah-run --learning-starts 500 --eval-interval 1000 --eval-episodes 2)
    work=$(mktemp -d) && flags+=(--compile --cudagraphs --bf16 --best-of-n 4 --checkpoint-interval 1000)
    (cd "$work" && python "$root/qsm_continuous.py" "${flags[@]}" --total-timesteps 2000) || return 1
    (cd "$work" && python "$root/qsm_continuous.py" --resume runs/* --total-timesteps 3000) | tee "$work/resumed.log"
    grep -q "^step 3000: eval return" "$work/resumed.log"
}
step cuda-tests python -m pytest -q -p no:cacheprovider -k "cuda" tests
step recommended-mode-and-resume run_and_resume
step egl-frame python -c "from dm_control import suite; print(suite.load('cheetah', 'run').physics.render(240, 320).shape)"
step speed python benchmarks/speed.py --cuda --env-ids cheetah-run --modes compile+cudagraphs compile+cudagraphs+bf16
grep "^|" "$logs/speed.log" | tee -a "$report"
exit $failed
