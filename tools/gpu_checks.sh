#!/usr/bin/env bash
# What only a GPU can show, in one pass sized for a short lease (about 8 minutes on an H100/H200):
# the gpu-marked tests, then the benchmarks of docs/gpu.md on the local spec (bf16) -- memory-lean
# vs plain log-probs at Llama-3's vocabulary, time per micro-batch against its size, SimPO vs DPO
# steps at the Llama-3.2-1B shape, and the micro-batch layouts vs TRL's CPOTrainer on SimPO-like
# lengths.
#
#   bash tools/gpu_checks.sh OUTDIR [transformer_engine]
#
# Each stage has its own time limit and its log goes to OUTDIR/gpu-checks.log (the tail of each is
# echoed); a failing stage does not stop the others. The JSON reports land in OUTDIR.
# STAGES="pytest-gpu steps": run only these stages (a rerun of part of it); GPU_TESTS_K: a -k
# expression selecting gpu-marked tests (e.g. "lean or varlen").
# The stages' limits add up to more than one device call may run (600 s), so a lease runs it in
# two calls, the first the more urgent (correctness of every GPU-only path, then the stage
# benchmarks):
#   STAGES="env smoke pytest-gpu logprobs logprobs-16k microbatch" bash tools/gpu_checks.sh OUT
#   STAGES="env steps steps-gemma2 lengths" bash tools/gpu_checks.sh OUT
# FALLBACK_PYTHONPATH: if the smoke stage fails (e.g. a Megatron-Core release this project does not
# run on yet), the remaining stages run again with this PYTHONPATH instead.
set -u
out=${1:?usage: bash tools/gpu_checks.sh OUTDIR [local|transformer_engine]}
impl=${2:-local}
mkdir -p "$out"
log="$out/gpu-checks.log"
export PYTHONUNBUFFERED=1 PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
bench="python3 -m tools.bench"

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2 began rc
    shift 2
    if [ -n "${STAGES:-}" ] && [[ " $STAGES " != *" $name "* ]]; then return 0; fi
    began=$(date +%s)
    echo "=== $name: $*" | tee -a "$log"
    timeout "$limit" "$@" > "$out/.stage.log" 2>&1
    rc=$?
    cat "$out/.stage.log" >> "$log"
    echo "=== $name: rc=$rc in $(( $(date +%s) - began )) s" | tee -a "$log"
    tail -n 20 "$out/.stage.log"
    rm -f "$out/.stage.log"
    return $rc
}

stage env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv;
    python3 -c "import sys, torch, megatron.core, transformers
print(sys.version.split()[0], torch.__version__, torch.version.cuda, megatron.core.__version__, transformers.__version__)
try:
    import transformer_engine; print(\"transformer_engine\", transformer_engine.__version__)
except ImportError as e: print(\"no transformer_engine:\", e)"'

smoke() { stage smoke 90 $bench steps --transformer-impl $impl --preset cpu-small --pairs 2 \
    --step-seq 256 --steps 1 --warmup 1; }
if ! smoke && [ -n "${FALLBACK_PYTHONPATH:-}" ]; then
    export PYTHONPATH="$(pwd):$FALLBACK_PYTHONPATH"
    stage env-fallback 30 python3 -c "import megatron.core; print('megatron-core', megatron.core.__version__)"
    smoke
fi

# FlexAttention's and the fused kernels' compiles make this the longest test stage.
stage pytest-gpu 180 python3 -m pytest -m gpu -q -rs tests ${GPU_TESTS_K:+-k "$GPU_TESTS_K"}
# The lean log-prob stage at 2,048 tokens (speed) and 16k tokens (memory), against the plain one.
stage logprobs 90 $bench logprobs --vocab 128256 --seq 2048 --hidden 2048 --chunk 1024 \
    --output "$out/logprobs.json"
stage logprobs-16k 60 $bench logprobs --vocab 128256 --seq 16384 --hidden 2048 \
    --chunk 1024 --steps 3 --warmup 1 --output "$out/logprobs-16k.json"
# Time per micro-batch of new shape vs its FLOPs at the 4,096-token rate (one profiled step).
stage microbatch 100 $bench microbatch --preset llama3.2-1b --tokens 1024 4096 \
    --microbatches 8 --steps 3 --warmup 2 --profile "$out" --output "$out/microbatch.json"
stage steps 180 $bench steps --transformer-impl $impl --preset llama3.2-1b --pairs 4 \
    --step-seq 2048 --chunk 1024 --output "$out/steps.json"
# Gemma-2's shape (soft-capping, alternating 4k windows, 256k vocabulary; local spec: TE refuses
# Gemma-2 here), bf16, tokens/s and MFU: issue 22's GPU figure for docs/performance.md.
stage steps-gemma2 150 $bench steps --transformer-impl local --preset gemma2-2b --pairs 4 \
    --step-seq 2048 --chunk 1024 --output "$out/steps-gemma2.json"
stage lengths 200 $bench lengths --preset llama3.2-1b --global-batch 32 --micro-batch 2 \
    --steps 2 --warmup 1 --output "$out/lengths.json"
echo "=== done" | tee -a "$log"
