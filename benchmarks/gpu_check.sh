#!/usr/bin/env bash
# One prepared GPU check for the offline GPU box (one H100 by default; Python 3.12, torch 2.11 CUDA,
# no megatron-core, no internet). See benchmarks/GPU.md. From the repository root, OUT set:
#
#   bash benchmarks/gpu_check.sh                        # on the GPU box (.whl and .gpu carried)
#   DEVICE_DRY_RUN=1 OUT=/tmp/gpuout PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   # CPU
#
# Stages, each under its own `timeout` and all inside GPU_CHECK_BUDGET seconds (default 480);
# a failed stage does not stop the next one. The real thing first:
#   trainer    benchmarks/gpu_trainer_check.py under torchrun --nproc-per-node 1 (NCCL; gloo in the
#              dry run): a random LLaMA-config model built and converted on the box, bf16 with
#              sharded-fp32 masters, HD-PiSSA with 4 virtual ranks and LoRA, a torch_dist save, a
#              resume compared with the uninterrupted run; tokens/s, peak memory
#   megatron-lm  examples/megatron_lm/pretrain_gpt_hdpissa.py: Megatron-LM's own loop on
#              --mock-data, small GPT, bf16 (skipped where megatron.training does not import, and
#              without CUDA: pretrain() needs it, see benchmarks/GPU.md)
#   tests      pytest -x on tests/device/test_cuda.py and any test named or marked for cuda/gpu/nccl:
#              NCCL, megatron-core DDP and its mixed-precision optimizer on the GPU
#   step       bench_step.py at LLaMA-7B layer shapes, bf16, one layer, 8192 tokens per step
#   decompose  bench_decompose.py at LLaMA-7B shapes: randomized vs exact speed-up, subspace error
#   dist       bench_dist.py --nproc 1 (skipped if the file does not exist)
#   tests-cpu  if time is left: test_equivalence, test_master_weights, test_ddp with CUDA hidden
#              (multi-rank gloo runs) against the carried megatron-core
# Writes at most 8 files to $OUT: env.txt, trainer.log (both trainer stages), tests.log, step.log,
# decompose.log, dist.log, results.json (every stage's JSON and the stage table) and RESULTS_gpu.md.
#
# Environment: OUT (required), PYTHON (python3), DEVICE_DRY_RUN=1 (CPU and tiny shapes),
# GPU_CHECK_BUDGET (seconds for the stages: 480, dry run 300), STAGES (order/subset, default
# "trainer megatron-lm tests step decompose dist tests-cpu"), GPU_CHECK_MATERIAL (tokenizer + JSONL
# folder, default .gpu: `python benchmarks/gpu_trainer_check.py --prepare .gpu` here; the dry run
# prepares it itself), GPU_CHECK_TRAINER_METHODS (hd-pissa,lora), GPU_CHECK_MLM_ARGS (replaces the
# megatron-lm stage's model/data flags), GPU_CHECK_WHEELS (wheel folder, .whl), GPU_CHECK_SITE
# (wheel install target, /tmp/site),
# GPU_CHECK_PYTEST_K (a pytest -k filter), GPU_CHECK_STEP_METHODS / GPU_CHECK_DIST_METHODS
# (--methods for bench_step / bench_dist; default: their full lists on the GPU).
set -u
set -o pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
if [ -z "${OUT:-}" ]; then
    echo "gpu_check: set OUT to the results folder (the device tool sets it)" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 2
DRY=${DEVICE_DRY_RUN:-0}
PY=${PYTHON:-python3}
if [ "$DRY" = 1 ]; then BUDGET=${GPU_CHECK_BUDGET:-300}; else BUDGET=${GPU_CHECK_BUDGET:-480}; fi
STAGES=${STAGES:-trainer megatron-lm tests step decompose dist tests-cpu}
MATERIAL=${GPU_CHECK_MATERIAL:-$ROOT/.gpu}
if [ "$DRY" = 1 ]; then SITE=${GPU_CHECK_SITE:-/tmp/site-dry}; else SITE=${GPU_CHECK_SITE:-/tmp/site}; fi
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore PYTHONDONTWRITEBYTECODE=1
START=$SECONDS
ENV_TXT=$OUT/env.txt
for f in env.txt trainer.log tests.log step.log decompose.log dist.log results.json RESULTS_gpu.md; do
    : > "$OUT/$f"
done
: > "$WORK/stages.tsv"

note() { echo "gpu_check: $*" | tee -a "$ENV_TXT"; }

# ---- wheels -> $SITE; PYTHONPATH ------------------------------------------------------------
# megatron.training's initialize_megatron runs `make -C <site>/megatron/core/datasets` on rank 0
# and exits when make fails (_compile_dependencies: megatron/training/initialize.py:155 and
# megatron/core/datasets/utils.py:25 in 0.19.2). The wheel ships that extension prebuilt
# (helpers_cpp*.so) but not the Makefile, so make stops at "no makefile found". Write one whose
# only target checks that the prebuilt extension is there: nothing is built. Where make itself
# is missing, a stand-in `make` (used by the megatron-lm stage only) does the same check.
MLM_PATH=$PATH
helpers_makefile() {  # SITE
    local ds=$1/megatron/core/datasets
    [ -d "$ds" ] || return 0
    if [ ! -e "$ds/Makefile" ]; then
        printf '%s\n' "# written by benchmarks/gpu_check.sh: the wheel ships helpers_cpp prebuilt; nothing to build" \
            "default:" $'\t@ls helpers_cpp*.so >/dev/null' >"$ds/Makefile"
        note "wrote $ds/Makefile (the wheel lacks it; megatron.training runs make there)"
    fi
    if ! command -v make >/dev/null; then
        mkdir -p "$WORK/bin"
        printf '%s\n' '#!/bin/sh' "# gpu_check.sh stand-in for make, absent here: megatron.training's" \
            "# _compile_dependencies runs make -C on the wheel's datasets folder; nothing to build there" \
            '[ "$1" = -C ] && ls "$2"/helpers_cpp*.so >/dev/null' >"$WORK/bin/make"
        chmod +x "$WORK/bin/make"
        MLM_PATH=$WORK/bin:$PATH
        note "no make on this machine: the megatron-lm stage gets a stand-in that checks for the prebuilt helpers"
    fi
}
WHEEL_DIR=${GPU_CHECK_WHEELS:-.whl}
shopt -s nullglob
WHEELS=("$WHEEL_DIR"/*.whl)
shopt -u nullglob
if [ ${#WHEELS[@]} -gt 0 ]; then
    note "installing ${#WHEELS[@]} wheel(s) into $SITE: ${WHEELS[*]}"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${WHEELS[@]}" >>"$ENV_TXT" 2>&1; then
        export PYTHONPATH=$SITE
        helpers_makefile "$SITE"
    elif [ "$DRY" = 1 ] && "$PY" -c "import megatron.core" 2>/dev/null; then
        # e.g. the cp312 megatron-core wheel and this machine's Python 3.11 .venv
        note "the $WHEEL_DIR/ wheels do not install for $PY (see above); dry run uses the megatron-core already installed for it"
    else
        note "ERROR: installing the carried wheels failed (see above)"
        exit 3
    fi
elif [ "$DRY" = 1 ] && "$PY" -c "import megatron.core" 2>/dev/null; then
    note "no $WHEEL_DIR/ wheels; dry run uses the megatron-core already installed for $PY"
else
    note "ERROR: no wheels in $WHEEL_DIR/ — run \`make gpu-wheels\` here and carry .whl (device tool: carry [\".whl\"])"
    exit 3
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$ROOT

# ---- environment ----------------------------------------------------------------------------
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  dry_run: $DRY  budget: ${BUDGET}s  stages: $STAGES"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    echo "PYTHONPATH=$PYTHONPATH"
    echo "--- nvidia-smi"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
        nvidia-smi 2>&1 | head -20
    else
        echo "(no nvidia-smi)"
    fi
    echo "--- make: $(command -v make || echo 'absent (megatron.training runs make; see helpers_makefile)')"
    echo "--- cpu: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2)"
    echo "--- python packages"
    "$PY" - <<'EOF' 2>&1
import importlib, platform, sys
print("python", sys.version.split()[0], sys.executable)
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("megatron.core", "megatron_hdpissa", "transformers", "numpy", "safetensors",
             "sentencepiece", "google.protobuf", "tqdm", "packaging", "einops", "triton"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} {getattr(m, '__file__', '')}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name} MISSING ({type(exc).__name__}: {exc})")
try:
    import megatron.training  # shipped in megatron-core wheels from 0.17 on
    print("megatron.training present")
except Exception as exc:  # noqa: BLE001
    print(f"megatron.training absent ({type(exc).__name__})")
EOF
} >>"$ENV_TXT" 2>&1
cat "$ENV_TXT"

# ---- stage runner ---------------------------------------------------------------------------
# run_stage NAME CAP_SECONDS LOG CMD...: tee'd to $OUT/LOG, recorded in $WORK/stages.tsv
run_stage() {
    local name=$1 cap=$2 log=$OUT/$3
    shift 3
    local left=$((BUDGET - (SECONDS - START)))
    local t=$((cap < left ? cap : left))
    if [ "$t" -lt 20 ]; then
        echo "=== $name: skipped, ${left}s of the ${BUDGET}s budget left" | tee -a "$log"
        printf '%s\tskipped (budget)\t0\t-\n' "$name" >>"$WORK/stages.tsv"
        return 0
    fi
    {
        echo "=== $name: $(date -u +%FT%TZ), timeout ${t}s"
        printf '$'; printf ' %q' "$@"; echo
    } | tee -a "$log"
    local t0=$SECONDS rc
    timeout --kill-after=10 "$t" "$@" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    local status=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT after ${t}s"
    elif [ "$rc" != 0 ]; then status="FAILED (rc $rc)"; fi
    echo "=== $name: $status in $((SECONDS - t0))s" | tee -a "$log"
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$rc" >>"$WORK/stages.tsv"
    return 0
}

# flags a benchmark's --help lists (its interface may still change)
has_flag() { grep -qE -- "(^|[[ ,])$2([] ,=]|\$)" "$WORK/$1.help" 2>/dev/null; }
helptext() { "$PY" "benchmarks/$1.py" --help >"$WORK/$1.help" 2>&1; }

# ---- stages ---------------------------------------------------------------------------------
TEST_FILES=()
for f in tests/peft/test_hd_pissa_layer.py tests/optimizer/test_master_weights.py tests/distributed/test_ddp.py; do
    [ -f "$f" ] && TEST_FILES+=("$f")
done
# tests elsewhere marked or named for cuda/gpu (or skipped without CUDA), found without importing
mapfile -t CUDA_NODES < <("$PY" - "${TEST_FILES[@]}" <<'EOF'
import ast, glob, re, sys
skip = set(sys.argv[1:])
pat = re.compile(r"cuda|gpu|nccl", re.I)
for path in sorted(glob.glob("tests/**/test_*.py", recursive=True)):
    if path in skip:
        continue
    try:
        tree = ast.parse(open(path, encoding="utf-8").read())
    except SyntaxError:
        continue
    def visit(body, prefix):
        for node in body:
            if isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                visit(node.body, prefix + node.name + "::")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
                decos = " ".join(ast.unparse(d) for d in node.decorator_list)
                if pat.search(node.name) or re.search(r"mark\.(cuda|gpu)|cuda\.is_available", decos):
                    print(f"{path}::{prefix}{node.name}")
    visit(tree.body, "")
EOF
)
PYTEST_K=()
if [ -n "${GPU_CHECK_PYTEST_K:-}" ]; then PYTEST_K=(-k "$GPU_CHECK_PYTEST_K")
elif [ "$DRY" = 1 ]; then PYTEST_K=(-k "test_matches_dense_reference and 1-1 or cuda"); fi

if [ "$DRY" = 1 ]; then
    DEV=(--device cpu) STEP_DEV=(--device cpu)
    STEP_ARGS=(--dtype fp32 --hidden 128 --ffn 352 --heads 4 --groups 2 --layers 1 --seq 64 --grad-accum 2
               --rank 4 --virtual-ranks 2 --rounds 1 --warmup 1 --iters 1 --threads 1)
    STEP_METHODS=${GPU_CHECK_STEP_METHODS:-hd-pissa,lora,published}
    DIST_METHODS=${GPU_CHECK_DIST_METHODS:-hd-pissa:sharded-fp32:factors,lora}
    DEC_ARGS=(--shapes 256x256,512x256 --spectra gaussian,powerlaw --K 4 --rank 8 --reps 1 --threads 1)
    DIST_ARGS=(--dtype fp32 --nproc 1 --hidden 128 --ffn 352 --heads 4 --groups 2 --layers 1 --seq 64
               --grad-accum 2 --rank 4 --iters 1 --threads 1)
    CAP_TESTS=90 CAP_STEP=90 CAP_DEC=60 CAP_DIST=90 CAP_TRAINER=150 CAP_MLM=90
    TRAINER_ARGS=(--dry-run)
    MLM_BACKEND=(--distributed-backend gloo)
else
    DEV=(--device cuda)
    # an explicit device index (bench_step sets the CUDA device from it)
    STEP_DEV=(--device cuda:0)
    # 1 x 1024 x 8 = 8192 tokens per optimizer step (the LoRA target is stated at >= 8k)
    STEP_ARGS=(--dtype bf16 --llama7b --layers 1 --micro-batch 1 --seq 1024 --grad-accum 8
               --rounds 1 --iters 3 --threads 8)
    DEC_ARGS=(--llama7b --reps 2 --threads 16)
    DIST_ARGS=(--dtype bf16 --llama7b --nproc 1 --micro-batch 1 --seq 1024 --grad-accum 8 --iters 3
               --threads 8)
    STEP_METHODS=${GPU_CHECK_STEP_METHODS:-}  # empty: each benchmark's default list
    DIST_METHODS=${GPU_CHECK_DIST_METHODS:-}
    CAP_TESTS=80 CAP_STEP=120 CAP_DEC=60 CAP_DIST=100 CAP_TRAINER=150 CAP_MLM=90
    TRAINER_ARGS=()
    MLM_BACKEND=()
fi
# Megatron-LM's loop: a small GPT on mock data, bf16, a few iterations (GPU_CHECK_MLM_ARGS replaces these)
read -r -a MLM_ARGS <<<"${GPU_CHECK_MLM_ARGS:---transformer-impl local --bf16 --num-layers 2 --hidden-size 256 \
--num-attention-heads 4 --ffn-hidden-size 1024 --seq-length 128 --max-position-embeddings 128 --micro-batch-size 2 \
--global-batch-size 8 --train-iters 6 --lr 1e-3 --weight-decay 0 --log-interval 1 --eval-iters 0 --mock-data \
--tokenizer-type NullTokenizer --vocab-size 4096 --hd-pissa-rank 8}"
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc-per-node 1)

stage_trainer() {  # the trainer end to end: HD-PiSSA (K = 4 virtual ranks) and LoRA, save + resume
    run_stage trainer "$CAP_TRAINER" trainer.log "${TORCHRUN[@]}" benchmarks/gpu_trainer_check.py \
        --material "$MATERIAL" --work "$WORK/trainer" --methods "${GPU_CHECK_TRAINER_METHODS:-hd-pissa,lora}" \
        "${TRAINER_ARGS[@]}" --json-out "$WORK/trainer.json" --markdown-out "$WORK/trainer.md"
}

stage_megatron_lm() {  # Megatron-LM's own training loop with the plug-in (helper script of issue 19)
    local script=examples/megatron_lm/pretrain_gpt_hdpissa.py why=""
    if [ ! -f "$script" ]; then why="$script does not exist"
    elif ! "$PY" -c "import megatron.training" >/dev/null 2>&1; then
        why="megatron.training does not import here (it ships in megatron-core >= 0.17 wheels)"
    elif ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; then
        # no flag avoids these; found on the CPU (benchmarks/GPU.md, 'The megatron-lm stage on a CPU')
        why="no CUDA: megatron.training.pretrain needs a GPU (0.19.2: training.py:1091 calls initialize_megatron"
        why+=" without allow_no_cuda, so initialize.py:66 asserts CUDA; initialize.py:357 builds the"
        why+=" model-parallel groups only with a GPU; initialize.py:508 warms up the JIT functions on cuda)"
    fi
    if [ -n "$why" ]; then
        echo "=== megatron-lm: skipped: $why" | tee -a "$OUT/trainer.log"
        printf 'megatron-lm\tskipped (%s)\t0\t-\n' "$why" >>"$WORK/stages.tsv"; return
    fi
    PATH=$MLM_PATH CUDA_DEVICE_MAX_CONNECTIONS=1 run_stage megatron-lm "$CAP_MLM" trainer.log "${TORCHRUN[@]}" "$script" \
        "${MLM_ARGS[@]}" "${MLM_BACKEND[@]}"
}

stage_tests() {  # the GPU tests (tests/device/test_cuda.py and any test named/marked for cuda), CUDA visible
    if [ ${#CUDA_NODES[@]} -eq 0 ]; then
        printf 'tests\tskipped (no cuda tests)\t0\t-\n' >>"$WORK/stages.tsv"; return
    fi
    echo "cuda/gpu tests: ${CUDA_NODES[*]}" | tee -a "$OUT/tests.log"
    run_stage tests "$CAP_TESTS" tests.log \
        "$PY" -m pytest -v --tb=short -x -rfE -m "not slow" -p no:cacheprovider --durations=10 \
        "${PYTEST_K[@]}" "${CUDA_NODES[@]}"
}

stage_tests_cpu() {  # the multi-rank gloo tests against megatron-core 0.19.2, CUDA hidden
    [ ${#TEST_FILES[@]} -eq 0 ] && return
    CUDA_VISIBLE_DEVICES= run_stage tests-cpu 120 tests.log \
        "$PY" -m pytest -v --tb=short -x -rfE -m "not slow" -p no:cacheprovider \
        "${PYTEST_K[@]}" "${TEST_FILES[@]}"
}

stage_step() {
    helptext bench_step
    local extra=()
    has_flag bench_step --svd && extra+=(--svd randomized)  # set-up only; not timed
    has_flag bench_step --timeout && extra+=(--timeout "$CAP_STEP")
    [ -n "$STEP_METHODS" ] && has_flag bench_step --methods && extra+=(--methods "$STEP_METHODS")
    run_stage step "$CAP_STEP" step.log "$PY" benchmarks/bench_step.py "${STEP_DEV[@]}" "${STEP_ARGS[@]}" \
        "${extra[@]}" --json-out "$WORK/step.json" --markdown-out "$WORK/step.md"
}

stage_decompose() {
    helptext bench_decompose
    local extra=()
    has_flag bench_decompose --smollm2-layer && extra+=(--smollm2-layer -1)  # not on the GPU box
    run_stage decompose "$CAP_DEC" decompose.log "$PY" benchmarks/bench_decompose.py "${DEV[@]}" \
        "${DEC_ARGS[@]}" "${extra[@]}" --json-out "$WORK/decompose.json" --markdown-out "$WORK/decompose.md"
}

stage_dist() {
    if [ ! -f benchmarks/bench_dist.py ]; then
        echo "=== dist: benchmarks/bench_dist.py does not exist; skipped" | tee -a "$OUT/dist.log"
        printf 'dist\tskipped (no bench_dist.py)\t0\t-\n' >>"$WORK/stages.tsv"; return
    fi
    helptext bench_dist
    local args=() a
    # pass only the flags this version of bench_dist.py has (value flags with their value)
    set -- "${DEV[@]}" "${DIST_ARGS[@]}"
    while [ $# -gt 0 ]; do
        a=$1; shift
        if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
            has_flag bench_dist "$a" && args+=("$a" "$1"); shift
        else
            has_flag bench_dist "$a" && args+=("$a")
        fi
    done
    has_flag bench_dist --svd && args+=(--svd randomized)
    has_flag bench_dist --timeout && args+=(--timeout "$CAP_DIST")
    [ -n "$DIST_METHODS" ] && has_flag bench_dist --methods && args+=(--methods "$DIST_METHODS")
    run_stage dist "$CAP_DIST" dist.log "$PY" benchmarks/bench_dist.py "${args[@]}" \
        --json-out "$WORK/dist.json" --markdown-out "$WORK/dist.md"
}

for s in $STAGES; do
    case $s in
        trainer) stage_trainer ;;
        megatron-lm) stage_megatron_lm ;;
        tests) stage_tests ;;
        tests-cpu) stage_tests_cpu ;;
        step) stage_step ;;
        decompose) stage_decompose ;;
        dist) stage_dist ;;
        *) note "unknown stage '$s' (trainer megatron-lm tests step decompose dist tests-cpu)" ;;
    esac
done

# ---- results --------------------------------------------------------------------------------
"$PY" - "$WORK" "$OUT" "$DRY" "$((SECONDS - START))" <<'EOF' || note "assembling results failed"
import json, os, re, sys
work, out, dry, elapsed = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
stages = []
with open(os.path.join(work, "stages.tsv")) as f:
    for line in f:
        name, status, secs, rc = line.rstrip("\n").split("\t")
        stages.append({"stage": name, "status": status, "seconds": int(secs), "rc": rc})

def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None

def test_summary(log):
    lines = [l for l in (read(os.path.join(out, log)) or "").splitlines()
             if re.match(r"=*\s*\d+ (passed|failed|errors?|deselected|skipped)\b|=*\s*no tests ran", l)]
    return lines

env = read(os.path.join(out, "env.txt")) or ""
ver = [l for l in env.splitlines() if re.match(r"(python|torch|megatron\.core|transformers|megatron\.training) ", l)]
gpu = [l for l in env.splitlines() if "H200" in l or "NVIDIA" in l][:1]
md = ["# GPU check" + (" (DRY RUN on CPU, tiny shapes: not a measurement)" if dry else ""), "",
      "Produced by `bash benchmarks/gpu_check.sh` (benchmarks/GPU.md); logs beside this file.", ""]
md += [f"- {l}" for l in gpu + ver]
md += [f"- total {elapsed} s", "", "| stage | status | seconds |", "|---|---|---:|"]
md += [f"| {s['stage']} | {s['status']} | {s['seconds']} |" for s in stages]
summ = test_summary("tests.log")
if summ:
    md += ["", "Tests: " + "; ".join(s.strip("= ") for s in summ)]
combined = {"dry_run": dry, "elapsed_s": elapsed, "stages": stages, "tests": summ}
mlm = [l.strip() for l in (read(os.path.join(out, "trainer.log")) or "").splitlines()
       if re.search(r"iteration\s+\d+/\s*\d+ \|.*lm loss", l)]
combined["megatron_lm_loss_lines"] = mlm
for key, title in (("trainer", "gpu_trainer_check.py: the trainer end to end (save, resume), one device"),
                   ("megatron_lm", "Megatron-LM's own loop (examples/megatron_lm), --mock-data"),
                   ("step", "bench_step.py: one optimizer step, LLaMA-7B layer shapes"),
                   ("decompose", "bench_decompose.py: randomized vs exact decomposition, LLaMA-7B shapes"),
                   ("dist", "bench_dist.py: real data parallelism (one process per rank)")):
    md += ["", f"## {title}", ""]
    if key == "megatron_lm":
        md += [f"    {l}" for l in mlm] or ["(no `lm loss` lines: see trainer.log)"]
        continue
    text = read(os.path.join(work, f"{key}.md"))
    md += [text.strip() if text else f"(no output: see {key}.log)"]
    raw = read(os.path.join(work, f"{key}.json"))
    if raw:
        try:
            combined[key] = json.loads(raw)
        except ValueError as exc:
            combined[key] = {"error": f"unreadable JSON: {exc}"}
with open(os.path.join(out, "RESULTS_gpu.md"), "w") as f:
    f.write("\n".join(md) + "\n")
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(combined, f, indent=1)
EOF
rm -rf "$WORK"
echo
cat "$OUT/RESULTS_gpu.md" | head -40
echo "gpu_check: done in $((SECONDS - START))s; $(find "$OUT" -type f | wc -l) files in $OUT"
