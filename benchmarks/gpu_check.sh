#!/usr/bin/env bash
# The checks to run when a GPU machine is available, in one command, within a time budget:
#   1. the CUDA tests (tests/test_cuda.py and the CUDA tests of test_contract/test_cluster),
#   2. `hessbench run suites/smoke.yaml --device cuda` as a user runs it, and its summary,
#   3. the cost table (benchmarks/cost_ratios.py --device cuda --quick --keep-going), one
#      process per problem family, most wanted first, until the budget is spent.
#
# Usage: bash benchmarks/gpu_check.sh OUT_DIR [BUDGET_SECONDS=480] [DEVICE=cuda]
# Writes OUT_DIR/{env.txt,tests.log,smoke.log,report.md,cost_stderr.log}. DEVICE=cpu runs the
# same plumbing on a machine without a GPU (the CUDA tests then skip).
set -u
out=${1:?usage: gpu_check.sh OUT_DIR [BUDGET_SECONDS] [DEVICE]}
budget=${2:-480}
device=${3:-cuda}
cd "$(dirname "$0")/.." || exit 1
mkdir -p "$out"
t0=$(date +%s)
deadline=$((t0 + budget))
elapsed() { echo $(($(date +%s) - t0)); }
export PYTHONUNBUFFERED=1
{
    command -v nvidia-smi >/dev/null && nvidia-smi
    python -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
    git log --oneline -1 2>/dev/null
} >"$out/env.txt" 2>&1

# 1. CUDA tests (pytest-benchmark off: it refuses to run under xdist in some versions)
timeout 150 python -m pytest -p no:cacheprovider -p no:benchmark -n 4 -q -rs \
    tests/test_cuda.py "tests/test_contract.py::test_cuda_device_contract" \
    "tests/test_cluster.py::test_cuda_run_matches_the_cpu_run" >"$out/tests.log" 2>&1
echo "tests rc=$? at $(elapsed) s" >>"$out/env.txt"

# 2. the CLI on the device
smoke="$out/smoke_run"
timeout 90 python -m hessbench run suites/smoke.yaml --device "$device" -o "$smoke" >"$out/smoke.log" 2>&1
echo "smoke rc=$? at $(elapsed) s" >>"$out/env.txt"

# 3. the cost table, family by family
: >"$out/report.md"
for family in cnn mlp costnet resnet resmlp gpt hutchinson matfree; do
    left=$((deadline - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        echo "cost $family skipped: budget spent" >>"$out/env.txt"
        continue
    fi
    part="$out/.cost_$family.md"
    timeout "$left" python benchmarks/cost_ratios.py --device "$device" --quick --keep-going \
        --only "$family" >"$part" 2>>"$out/cost_stderr.log"
    echo "cost $family rc=$? at $(elapsed) s" >>"$out/env.txt"
    if [ ! -s "$out/report.md" ]; then
        cat "$part" >>"$out/report.md" # the first part keeps the header
    else
        { echo; sed -n '/^## /,$p' "$part"; } >>"$out/report.md"
    fi
    rm -f "$part"
done
echo "done at $(elapsed) s" >>"$out/env.txt"
