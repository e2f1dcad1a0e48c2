#!/usr/bin/env bash
# One command for a lent GPU machine, run from a copy of the repo:
#
#     bash benchmarks/gpu.sh
#
# It builds vaekern's extension, runs the whole test suite on CUDA, runs the benchmarks at
# the issue's sizes and the overhead and e2e cases, and writes everything (step log,
# versions, nvidia-smi -q, build, test and benchmark logs, the benchmark tables, CSV, JSON
# and plots) into one folder: $OUT if set, else results/gpu_<date>. With ARCHIVE=path.tar.gz it also packs that folder into one
# file, for a machine from which only a few files come back.
#
# Made for an H100 with torch 2.11+cu130, triton 3.6, Python 3.12 and no internet. The whole
# script stays under 8 minutes: VAEKERN_GPU_BUDGET_S (default 440 s) is shared out between
# the steps, each step runs under `timeout` (SIGINT first, so pytest and the benchmarks still
# write what they have), and the benchmarks stop starting new cases when their share is spent.
# A failing step is logged in steps.txt and the next step still runs.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${VAEKERN_GPU_BUDGET_S:-440}
OUT=${OUT:-results/gpu_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$(command -v python3 || command -v python)}  # python3: some images have no "python"
export PYTHONUNBUFFERED=1
# Importable from the source tree even if the editable install below fails.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET - $(elapsed) )); }

# step NAME LIMIT_S CMD...: run CMD with output in $OUT/NAME.log, under a time limit.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    if (( limit < 10 )); then
        echo "$name: skipped, no time left ($(elapsed) s spent)" | tee -a "$OUT/steps.txt"
        return 0
    fi
    t0=$(date +%s)
    echo "== $name (limit ${limit} s, at $(elapsed) s): $*" | tee -a "$OUT/steps.txt"
    timeout -s INT -k 20 "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s$( ((rc == 124)) && echo ' (TIMED OUT)')" \
        | tee -a "$OUT/steps.txt"
    RC=$rc
    return 0
}
RC=0

# ---- the machine and the versions ----------------------------------------------------------
{
    echo "date: $(date -Is)"
    echo "host: $(hostname)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo none) $(git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && echo dirty)"
    echo "python: $($PY --version 2>&1)"
    $PY - <<'EOF' 2>&1
import importlib.metadata as md
import torch
for dist in ("torch", "triton", "numpy", "pytest", "pytest-benchmark", "matplotlib", "tqdm"):
    try:
        print(f"{dist}: {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}: not installed")
print("torch.version.cuda:", torch.version.cuda)
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"sm_{p.major}{p.minor}, L2 {p.L2_cache_size / 2**20:.0f} MiB")
EOF
    echo "nvcc: $(nvcc --version 2>&1 | tail -n 2 | tr '\n' ' ')"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,temperature.gpu,persistence_mode,mig.mode.current --format=csv 2>&1
} >"$OUT/versions.txt" 2>&1
nvidia-smi -q >"$OUT/nvidia-smi-q.txt" 2>&1
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -m pip list >"$OUT/pip-list.txt" 2>&1
cat "$OUT/versions.txt"

# ---- build -----------------------------------------------------------------------------------
# torch's guess of the toolkit follows the nvcc on PATH, which can be a wrapper: prefer the real one.
if [[ -z "${CUDA_HOME:-}" ]]; then
    if [[ -x /usr/local/cuda/bin/nvcc ]]; then
        export CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then
        export CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
    fi
fi
echo "CUDA_HOME=${CUDA_HOME:-not found}" | tee -a "$OUT/steps.txt"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}  # H100 only: half the compile time
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
t_build=$(date +%s)
step build 180 $PY -m pip install --no-build-isolation --no-deps --no-index -v -e .
if (( RC != 0 && $(date +%s) - t_build < 60 )); then
    # A quick failure is pip or packaging, not the compiler: build the extension in place.
    step build 150 $PY setup.py build_ext --inplace
fi
$PY -c "import vaekern, torch; print('available backends on cuda:', vaekern.available_backends('cuda' if torch.cuda.is_available() else 'cpu'))" \
    2>&1 | tee -a "$OUT/steps.txt"

# ---- tests -----------------------------------------------------------------------------------
# At most 150 s, and never so long that the benchmarks get less than 170 s.
limit=$(( $(left) - 170 )); (( limit > 150 )) && limit=150
# On a fresh machine most of that time is Triton compiling each kernel specialization once:
# with pytest-xdist, 8 workers compile in parallel (one GPU is plenty for them).
parallel=()
$PY -c 'import xdist' 2>/dev/null && parallel=(-n 8)
# pytest reports and writes its XML on SIGINT, but only if SIGINT is not ignored (as it is
# in a background job), hence the handler.
step tests "$limit" $PY -c 'import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))' tests -q -p no:cacheprovider --durations=15 --junitxml="$OUT/tests.xml" "${parallel[@]}"
tail -n 3 "$OUT/tests.log" 2>/dev/null | tee -a "$OUT/steps.txt"

# ---- benchmarks --------------------------------------------------------------------------------
# First the headline, vae_loss in every mode at all three sizes in float32 and bfloat16; then
# the whole-call cases (host overhead on 1x1 tensors, and one training step of the
# pytorch/examples VAE: most of their time is torch.compile's); then the parts and the cases with options in
# fwd+bwd, float32, without the second compiled formula (each compile costs seconds). Each
# pass stops starting cases 30 s before its limit.
common=(--rep-ms 50 --warmup-ms 10 --no-progress)
limit=$(( $(left) / 2 ))
step bench_vae_loss "$limit" $PY -m benchmarks --ops vae_loss --dtypes float32,bfloat16 \
    --max-seconds $(( limit - 30 )) --out "$OUT/bench_vae_loss" "${common[@]}"
limit=$(( $(left) / 2 )); (( limit > 120 )) && limit=120
step bench_steps "$limit" $PY -m benchmarks --ops overhead,e2e --min-run-time 0.5 \
    --max-seconds $(( limit - 30 )) --out "$OUT/bench_steps" "${common[@]}"
limit=$(( $(left) - 5 ))
step bench_parts "$limit" $PY -m benchmarks --ops bernoulli_nll,gaussian_kl,reparameterize,gaussian_nll_optimal,gaussian_nll_learned,vae_loss_gaussian,vae_loss_continuous_bernoulli,gaussian_kl_free_bits,vae_loss_prior,vae_loss_prior_free_bits \
    --dtypes float32 --modes fwd+bwd --providers eager,eager-keras,compile,reference,triton,cuda \
    --max-seconds $(( limit - 30 )) --out "$OUT/bench_parts" "${common[@]}"

{
    echo "# vaekern on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
    echo
    echo '```'
    cat "$OUT/steps.txt"
    echo '```'
    for d in bench_vae_loss bench_steps bench_parts; do
        [[ -f "$OUT/$d/results.md" ]] && { echo; echo "## $d"; echo; cat "$OUT/$d/results.md"; }
    done
} >"$OUT/summary.md"
if [[ -n "${ARCHIVE:-}" ]]; then
    tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "packed into $ARCHIVE"
fi
echo "done in $(elapsed) s; everything is in $OUT (start with summary.md)"
