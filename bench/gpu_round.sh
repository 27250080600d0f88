#!/usr/bin/env bash
# One round of every GPU measurement the docs quote, on one machine, into one folder:
# the CUDA-only tests, the serving bench (8B shape, 4-bit sym/asym, 3-bit, fp16 reference,
# profile), the engine end to end from disk (default and --plain), in memory, and one
# layer's trace. Each step has a time limit and its own log, so one that fails or hangs
# leaves the others. Run from the repository root on a machine with a CUDA GPU:
#
#   bash bench/gpu_round.sh OUT_DIR [STEP...]
#
# STEP: tests serve e2e e2e-plain e2e-plain-computed (the attention half computed in every
# pass, not replayed) e2e-plain-phases (GPTQ_WORKER_PROFILE=1) speed speed-plain trace
# trace-first trace-first-plain solve validate-profile (after e2e or e2e-plain) importtime
# image-like e2e-70b; a step named twice logs to NAME.2.txt the second time. Default:
# tests serve e2e e2e-plain speed trace, about 9 minutes on an H200 from a cold Triton
# cache. image-like uninstalls scikit-learn and SciPy for the steps after it: the worker
# image has neither, and transformers imports them when present (on a device machine,
# which is fresh each call). Copy what the docs quote into bench/results/ with the
# machine, date and commit in a header line. GPU_ROUND_TAR=1: pack OUT_DIR into
# OUT_DIR.tar.gz at the end (one file to bring back).
set -u
out=${1:?usage: bash bench/gpu_round.sh OUT_DIR [STEP...]}
shift
steps=${*:-tests serve e2e e2e-plain speed trace}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
    date -u +%FT%TZ
    git rev-parse --short HEAD 2>/dev/null || echo "(no git)"
    nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader 2>&1
    python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" 2>&1
    nproc
} > "$out/env.txt"

run() {  # name, seconds, command...; a step run again logs to NAME.2.txt, NAME.3.txt...
    local name=$1 limit=$2 n=2
    shift 2
    if [ -e "$out/$name.txt" ]; then
        while [ -e "$out/$name.$n.txt" ]; do n=$((n + 1)); done
        name=$name.$n
    fi
    local t0=$SECONDS
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "$name rc=$? $((SECONDS - t0))s" | tee -a "$out/steps.txt"
}

for step in $steps; do
    case $step in
        tests) run cuda-tests 300 python3 -m pytest -q -p no:cacheprovider \
            tests/worker/test_gpu_paths_cuda.py tests/worker/test_transfers_cuda.py ;;
        serve) run serve 360 python3 bench/serve_speed.py --shape llama-3-8b \
            --configs 4:sym,4:asym,3:sym --hf-reference --profile --profile-configs 4:sym \
            --json "$out/serve.jsonl" ;;
        e2e) run e2e 200 python3 bench/e2e.py --shape llama-3-8b --dir /tmp/gpu-round-e2e \
            --verbose --keep --reuse --bytecode-cache /tmp/gpu-round-pyc ;;
        e2e-plain) run e2e-plain 200 python3 bench/e2e.py --shape llama-3-8b --plain \
            --dir /tmp/gpu-round-e2e --verbose --keep --reuse --bytecode-cache /tmp/gpu-round-pyc ;;
        e2e-plain-computed) GPTQ_WORKER_REPLAY_ATTENTION=0 run e2e-plain-computed 200 \
            python3 bench/e2e.py --shape llama-3-8b --plain --dir /tmp/gpu-round-e2e --verbose \
            --keep --reuse --bytecode-cache /tmp/gpu-round-pyc ;;
        e2e-plain-phases) GPTQ_WORKER_PROFILE=1 run e2e-plain-phases 200 python3 bench/e2e.py \
            --shape llama-3-8b --plain --dir /tmp/gpu-round-e2e --verbose --keep --reuse \
            --bytecode-cache /tmp/gpu-round-pyc ;;
        speed) run speed 150 python3 bench/speed.py --shape llama-3-8b ;;
        speed-plain) run speed-plain 120 python3 bench/speed.py --shape llama-3-8b --plain ;;
        trace) run trace 150 python3 bench/layer_trace.py --shape llama-3-8b --layers 3 --cprofile ;;
        trace-first) run trace-first 120 python3 bench/layer_trace.py --shape llama-3-8b \
            --layers 2 --first-layer ;;
        trace-first-plain) run trace-first-plain 120 python3 bench/layer_trace.py \
            --shape llama-3-8b --plain --layers 2 --first-layer ;;
        solve) run solve 150 python3 bench/solve.py ;;
        validate-profile) run validate-profile 120 python3 -c "import cProfile, pstats, time
from gptq_worker.format.validate import validate_checkpoint
for i in range(2):
    t = time.monotonic(); r = validate_checkpoint('/tmp/gpu-round-e2e/out')
    print('validate', i, round(time.monotonic() - t, 3), 's, errors', r.errors)
cProfile.run(\"validate_checkpoint('/tmp/gpu-round-e2e/out')\", '/tmp/vp')
pstats.Stats('/tmp/vp').sort_stats('cumulative').print_stats(35)" ;;
        image-like) run image-like 120 python3 -m pip uninstall -y scikit-learn scipy ;;
        importtime) run importtime 120 bash -c "python3 -m pip list 2>/dev/null | grep -iE \
            '^(scikit-learn|scipy|torchao|accelerate|torchvision|pandas|numba) '; \
            python3 -X importtime -c 'import gptq_worker.pipeline.run, transformers.models.llama.modeling_llama' \
            2> /tmp/importtime.txt; sort -t'|' -k2 -n -r /tmp/importtime.txt | head -60" ;;
        e2e-70b) run e2e-70b 300 python3 bench/e2e.py --shape llama-3-70b --layers 4 \
            --dir /tmp/gpu-round-e2e70 --verbose --bytecode-cache /tmp/gpu-round-pyc ;;
        *) echo "unknown step $step" >&2; exit 2 ;;
    esac
done
rm -rf /tmp/gpu-round-e2e /tmp/gpu-round-e2e70
cat "$out/steps.txt"
if [ "${GPU_ROUND_TAR:-0}" = 1 ]; then  # one file instead of one per step (for a transfer
    # that brings back only a few files): OUT_DIR.tar.gz, the folder removed
    tar czf "$out.tar.gz" -C "$(dirname "$out")" "$(basename "$out")" && rm -rf "$out"
fi
