#!/usr/bin/env bash
# Everything one GPU session should produce, written under $OUT (default out/), in about 9 minutes on one
# H100/H200: nvidia-smi, `flash-softmax info`, the test suite compiled on the GPU (junit XML), a tuned
# configuration table (`flash-softmax tune`), `info` again with that table, and the benchmark sweeps
# (attention against every provider, softmax and log_softmax, a packed batch of mixed lengths, a decoding step over
# a key/value cache). It runs in the repo root wherever it is
# started from (a relative OUT is under the repo root).
#
#   scripts/gpu_check.sh             # on the GPU machine (make gpu)
#   scripts/gpu_check.sh --dry-run   # on a CPU: every phase at tiny sizes in Triton's interpreter (make gpu-dry-run)
#
# Each phase runs under `timeout` with a limit that fits the session (GPU_CHECK_SECONDS in all, default
# 530 s); a phase that fails or times out is recorded and the next one runs. $OUT/summary.txt has one line
# per phase with its status, exit code and time; the exit status is 0 only when every phase passed.
#
# Environment: OUT, PYTHON (default python3), GPU_CHECK_SECONDS, GPU_CHECK_TEST_SHARDS (parallel pytest
# processes, default 6 on a GPU: compiling kernels is single-threaded and most of the suite's time there).

set -u -o pipefail

DRY_RUN=0
for argument in "$@"; do
    case "$argument" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$argument'; expected --dry-run or --help" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
OUT=${OUT:-out}
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if (( DRY_RUN )); then
    # Behave as on a machine without a GPU even where there is one: the interpreter, tiny sizes.
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    BUDGET=${GPU_CHECK_SECONDS:-400}
    SHARDS=${GPU_CHECK_TEST_SHARDS:-2}
else
    BUDGET=${GPU_CHECK_SECONDS:-530}
    SHARDS=${GPU_CHECK_TEST_SHARDS:-6}
fi
# A table left in the environment would change what the tests and the first info report see.
unset FLASH_SOFTMAX_CONFIG_TABLE

mkdir -p "$OUT" || exit 2
SUMMARY="$OUT/summary.txt"
START=$(date +%s)
DEADLINE=$((START + BUDGET))
FAILURES=0
{
    echo "gpu_check.sh$( ((DRY_RUN)) && echo ' --dry-run') started $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s"
    printf '%-20s %-10s %-7s %-8s %s\n' phase status rc seconds output
} > "$SUMMARY"

# Python with SIGINT as KeyboardInterrupt whatever it inherited (a background job of a non-interactive
# shell may start with SIGINT ignored, and Python then leaves it ignored): `timeout -s INT` then lets
# pytest write its junit XML and `tune` the table it has, instead of being killed with nothing written.
PYRUN=("$PYTHON" -c 'import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)')

# The limit a phase gets: its cap, or what is left of the budget (minus a margin for the kill grace).
phase_limit() {
    local cap=$1 left=$((DEADLINE - $(date +%s) - 20))
    echo $((cap < left ? cap : left))
}

record() {  # name status rc seconds output
    printf '%-20s %-10s %-7s %-8s %s\n' "$1" "$2" "$3" "$4" "$5" >> "$SUMMARY"
    echo "== $1: $2 (rc $3, $4 s) -> $5"
    # "skipped" is a phase with nothing to do here; "no-time" one the budget did not reach: a loss.
    if [[ "$2" != ok && "$2" != skipped ]]; then FAILURES=$((FAILURES + 1)); fi
}

status_of() {  # exit code -> word
    case "$1" in
        0) echo ok ;;
        124) echo "timed-out" ;;
        137) echo killed ;;
        *) echo failed ;;
    esac
}

# run_phase NAME CAP COMMAND...: the command's output goes to $OUT/NAME.txt.
run_phase() {
    local name=$1 cap=$2
    shift 2
    local limit
    limit=$(phase_limit "$cap")
    if ((limit < 10)); then
        record "$name" no-time - 0 "out of time: the budget is spent"
        return 0
    fi
    local shown="$*"
    if [[ "$1" == "$PYTHON" && "${2:-}" == -c ]]; then shown="$PYTHON -m ${*:4}"; fi  # not PYRUN's code
    echo "== $name (limit ${limit}s): $shown" | cut -c1-220
    local began=$(date +%s)
    timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    record "$name" "$(status_of $rc)" $rc $(($(date +%s) - began)) "$OUT/$name.txt"
    tail -n 3 "$OUT/$name.txt" | sed 's/^/   /'
    return 0
}

# --- sizes: the real ones, or tiny ones for the interpreter -------------------------------------------------
if (( DRY_RUN )); then
    TEST_SELECTION=(tests/test_tune.py -k "lookup or round_trips or dry_run")
    TUNE_FLAGS=(--dry-run --arch sm_90a --shared-memory 232448)
    ATTENTION_SIZES=(--dtypes float16 --seqlens 64 --batch 1 --heads 2)
    ATTENTION_PROVIDERS=(flash_softmax sdpa_math naive)
    CAUSAL=(true)
    FLEX_SIZES=(--dtypes float16 --seqlens 64 --batch 1 --heads 2)
    FLEX_PROVIDERS=(flash_softmax)   # compiling FlexAttention for the CPU takes half a minute per shape
    MODIFIER_SIZES=(--dtypes float16 --seqlens 64 --batch 1 --heads 2)
    VARLEN_SIZES=(--dtypes float16 --varlen-sequences 2 --varlen-lengths 8 24 --heads 2)
    VARLEN_PROVIDERS=(flash_softmax flash_softmax_padded)
    DECODE_SIZES=(--dtypes float16 --decode-batches 1 2 --decode-lengths 32 --heads 4 --gqa 2 --head-dims 16)
    DECODE_PROVIDERS=(flash_softmax flash_softmax_paged sdpa_math)
    HEAD_DIMS_A=32 HEAD_DIMS_B=16
    SOFTMAX_SIZES=(--dtypes float16 --cols 256 4096 --rows 4)
    SOFTMAX_PROVIDERS=(flash_softmax torch)   # torch.compile for the CPU needs seconds per shape
else
    TEST_SELECTION=(tests)
    TUNE_FLAGS=(--fresh --candidates-csv "$OUT/tune_candidates.csv")
    ATTENTION_SIZES=(--dtypes bfloat16 --seqlens 1024 2048 4096 8192 16384)
    ATTENTION_PROVIDERS=(flash_softmax sdpa_flash sdpa_cudnn sdpa_efficient sdpa_math naive)
    CAUSAL=(false true)
    FLEX_SIZES=(--dtypes bfloat16 --seqlens 4096)
    FLEX_PROVIDERS=(flash_softmax flex)
    MODIFIER_SIZES=(--dtypes bfloat16 --seqlens 4096)
    VARLEN_SIZES=(--dtypes bfloat16 --varlen-tokens 32768 --varlen-lengths 128 8192)
    # FlexAttention compiles each mode for tens of seconds: `bench --varlen --providers flex` outside the session.
    VARLEN_PROVIDERS=(flash_softmax flash_softmax_padded sdpa_efficient sdpa_cudnn)
    # Four shapes of the default sweep (32 query heads on 8 K/V heads, head dim 128): one sequence, where split-KV
    # matters, and 64. `make gpu-bench` runs the whole sweep, SDPA's math backend (eager matmuls over repeated K/V
    # heads) and FlexAttention (compiled per shape) included.
    DECODE_SIZES=(--dtypes bfloat16 --decode-batches 1 64 --decode-lengths 4096 32768)
    DECODE_PROVIDERS=(flash_softmax flash_softmax_paged sdpa_flash sdpa_efficient sdpa_cudnn)
    HEAD_DIMS_A=128 HEAD_DIMS_B=64
    SOFTMAX_SIZES=(--dtypes bfloat16 --cols 1024 4096 16384 65536 262144)
    SOFTMAX_PROVIDERS=(flash_softmax torch torch_compile)
fi

# --- 1. the machine ----------------------------------------------------------------------------------------
if command -v nvidia-smi > /dev/null; then
    run_phase nvidia-smi 20 bash -c 'nvidia-smi && nvidia-smi -q'
else
    record nvidia-smi "$( ((DRY_RUN)) && echo skipped || echo failed)" - 0 "no nvidia-smi on this machine"
fi
run_phase info 60 "${PYRUN[@]}" flash_softmax info

# --- 2. the test suite, in parallel shards ---------------------------------------------------------------
# Test ids are dealt round-robin, so each shard gets a share of every file (and of the slow ones).
tests_phase() {
    local limit
    limit=$(phase_limit 150)
    if ((limit < 30)); then
        record pytest no-time - 0 "out of time: the budget is spent"
        return
    fi
    local began=$(date +%s)
    "${PYRUN[@]}" pytest --collect-only -q -p no:cacheprovider --continue-on-collection-errors \
        "${TEST_SELECTION[@]}" > "$OUT/pytest_collect.txt" 2>&1
    local collect_rc=$?
    mapfile -t ids < <(grep '::' "$OUT/pytest_collect.txt")
    # 5: nothing collected. Collection errors are in the file and are reported, the rest still runs.
    if ((collect_rc != 0)); then
        record pytest-collect failed $collect_rc $(($(date +%s) - began)) "$OUT/pytest_collect.txt"
    fi
    if ((${#ids[@]} == 0)); then
        record pytest failed - 0 "no tests collected"
        return
    fi
    local shards=$((SHARDS < ${#ids[@]} ? SHARDS : ${#ids[@]}))
    limit=$(phase_limit $((150 - ($(date +%s) - began))))
    echo "== pytest: ${#ids[@]} tests in $shards shards (limit ${limit}s)"
    local pids=() shard
    for ((shard = 0; shard < shards; shard++)); do
        local part=()
        for ((i = shard; i < ${#ids[@]}; i += shards)); do part+=("${ids[i]}"); done
        timeout -s INT -k 20 "$limit" "${PYRUN[@]}" pytest -q -rs -p no:cacheprovider \
            --junitxml="$OUT/pytest-shard$shard.xml" "${part[@]}" > "$OUT/pytest-shard$shard.txt" 2>&1 &
        pids+=($!)
    done
    local worst=0 rc
    : > "$OUT/pytest.txt"
    for ((shard = 0; shard < shards; shard++)); do
        wait "${pids[shard]}"
        rc=$?
        # pytest: 0 passed, 1 some failed; timeout: 124. Keep the worst for the summary.
        if ((rc != 0 && (worst == 0 || rc == 124))); then worst=$rc; fi
        echo "shard $shard (rc $rc): $(tail -n 1 "$OUT/pytest-shard$shard.txt")" >> "$OUT/pytest.txt"
        grep -E '^(FAILED|ERROR|SKIPPED)' "$OUT/pytest-shard$shard.txt" >> "$OUT/pytest.txt"
    done
    record pytest "$(status_of $worst)" $worst $(($(date +%s) - began)) "$OUT/pytest.txt (+ pytest-shard*.txt/.xml)"
    head -n "$shards" "$OUT/pytest.txt" | sed 's/^/   /'
}
tests_phase

# --- 3. the tuned table ------------------------------------------------------------------------------------
# `tune` gets the phase's limit minus what starting Python, the summary and writing take.
TUNE_LIMIT=$(phase_limit 150)
TUNE_BUDGET=$((TUNE_LIMIT > 60 ? TUNE_LIMIT - 35 : 25))
mkdir -p "$OUT/configs"
run_phase tune 150 "${PYRUN[@]}" flash_softmax tune --dtypes bfloat16 --head-dims 128 64 256 \
    --seqlens 1024 2048 4096 8192 16384 --budget-seconds "$TUNE_BUDGET" --out "$OUT/configs/" "${TUNE_FLAGS[@]}"

TABLE=$(find "$OUT/configs" -name '*.json' 2> /dev/null | head -n 1)
if [[ -n "$TABLE" ]]; then
    [[ "$TABLE" == /* ]] || TABLE="$PWD/$TABLE"
    # From here on, launches use the table just measured: info shows its sources, the benchmarks its tiles.
    export FLASH_SOFTMAX_CONFIG_TABLE="$TABLE"
    run_phase info-tuned 40 "${PYRUN[@]}" flash_softmax info
else
    record info-tuned skipped - 0 "no table was written"
fi

# --- 4. benchmarks -----------------------------------------------------------------------------------------
bench() {  # name cap bench-arguments...
    local name=$1 cap=$2
    shift 2
    run_phase "$name" "$cap" "${PYRUN[@]}" flash_softmax bench "$@" --out "$OUT/bench/$name"
}
bench attention-d$HEAD_DIMS_A 75 --op attention "${ATTENTION_SIZES[@]}" --head-dims $HEAD_DIMS_A \
    --causal "${CAUSAL[@]}" --modes fwd bwd fwd_bwd --providers "${ATTENTION_PROVIDERS[@]}"
bench attention-d$HEAD_DIMS_B 75 --op attention "${ATTENTION_SIZES[@]}" --head-dims $HEAD_DIMS_B \
    --causal "${CAUSAL[@]}" --modes fwd bwd fwd_bwd --providers "${ATTENTION_PROVIDERS[@]}"
bench softmax 45 --op softmax "${SOFTMAX_SIZES[@]}" --modes fwd bwd fwd_bwd --providers "${SOFTMAX_PROVIDERS[@]}"
bench log_softmax 45 --op log_softmax "${SOFTMAX_SIZES[@]}" --modes fwd bwd fwd_bwd \
    --providers "${SOFTMAX_PROVIDERS[@]}"
# One packed batch of mixed lengths (seed 0): flash_attention_varlen against the padded batch.
bench attention-varlen 45 --op attention --varlen "${VARLEN_SIZES[@]}" --head-dims $HEAD_DIMS_A \
    --causal "${CAUSAL[@]}" --modes fwd fwd_bwd --providers "${VARLEN_PROVIDERS[@]}"
# One decoding step (a query per sequence over its cache; the copy bandwidth is always measured beside it).
bench attention-decode 45 --op attention --decode "${DECODE_SIZES[@]}" --providers "${DECODE_PROVIDERS[@]}"
# FlexAttention compiles every shape and mode (tens of seconds each): one length, last.
bench attention-flex 70 --op attention "${FLEX_SIZES[@]}" --head-dims $HEAD_DIMS_A --causal "${CAUSAL[@]}" \
    --modes fwd bwd fwd_bwd --providers "${FLEX_PROVIDERS[@]}"
# Each score modifier's overhead over plain attention (the overhead_vs_plain column), our kernel only.
bench attention-modifiers 40 --op attention "${MODIFIER_SIZES[@]}" --head-dims $HEAD_DIMS_A --causal true \
    --modes fwd fwd_bwd --providers flash_softmax --modifiers sinks alibi dropout bias

ELAPSED=$(($(date +%s) - START))
echo "finished after ${ELAPSED}s, $FAILURES phase(s) not ok" >> "$SUMMARY"
echo
cat "$SUMMARY"
((FAILURES == 0))
