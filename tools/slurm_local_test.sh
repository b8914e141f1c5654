#!/usr/bin/env bash
# Run examples/slurm/finetune_hdpissa.sbatch on a throw-away one-node SLURM cluster on this
# machine (CPU/gloo, 2 tasks) in both launch modes and compare each job's results with the same
# command under torchrun: they must be equal.
#
#   sudo tools/slurm_local_test.sh [options] [-- ARGS...]
#
# By default every run is the real fine-tune, `python -m megatron_hdpissa.finetune`, with 2
# data-parallel ranks on SmolLM2-135M-Instruct truncated to 2 layers (converted here with
# tools/convert_hf_to_megatron.py) and 16 GSM8K problems, for --iters iterations with --log-json
# and --save. Compared exactly: the logged losses, learning rates and held-out loss
# (tokens_per_s ignored) and a digest (SHA-256 of every tensor) of the saved checkpoint: the
# updated weights and each rank's factors, optimizer moments, data position and RNG state. Every
# flag that matters is passed to both runs explicitly (the sbatch defaults are overridden).
#
# Options:
#   --python PATH     Python with megatron_hdpissa installed (default: REPO/.venv/bin/python)
#   --iters N         fine-tune iterations (default: 3)
#   --selftest        run the launcher's self-test instead (no model: process groups only)
#   --entry "CMD"     what each rank runs instead (give its ARGS after --)
#   --digest DIR      after each run, digest the *.pt files under DIR ({out} allowed) into
#                     {out}/checkpoint_digest.json (default for the fine-tune: {out}-ckpt)
#   --modes "M ..."   launch modes of the sbatch to test (default: "task node")
#   --timeout SEC     per job (default: 600)
#   --ignore "K ..."  result keys not compared (default for the fine-tune: tokens_per_s)
#   --rtol R          relative tolerance for numbers (default: 0, exact)
#   --keep            keep the work directory (logs, slurm.conf, material, results)
# ARGS go to every run of the command; {out} is replaced by that run's own output directory,
# where it must write its *.json / *.jsonl results.
#
# Needs root: it installs slurmctld, slurmd, slurm-client and munge with apt-get if missing,
# starts munged (unless one answers already), slurmctld and slurmd in the foreground as
# children of this script, and on exit stops exactly those PIDs.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=$REPO/.venv/bin/python
ENTRY=""
ITERS=3
SELFTEST=0
DIGEST=""
MODES="task node"
TIMEOUT=600
IGNORE=""
RTOL=0
KEEP=0
NTASKS=2

die() { echo "slurm_local_test: $*" >&2; exit 1; }
now_ms() { local t=${EPOCHREALTIME/[.,]/}; echo $((t / 1000)); }
T0=$(now_ms)
secs() { local ms=$(($(now_ms) - $1)); printf '%d.%01d' $((ms / 1000)) $((ms % 1000 / 100)); }  # since $1
say() { printf '[%6ss] %s\n' "$(secs "$T0")" "$*"; }

while (($#)); do
  case $1 in
    --python) PYTHON=$2; shift 2 ;;
    --iters) ITERS=$2; shift 2 ;;
    --selftest) SELFTEST=1; shift ;;
    --entry) ENTRY=$2; shift 2 ;;
    --digest) DIGEST=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --ignore) IGNORE=$2; shift 2 ;;
    --rtol) RTOL=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
ARGS=("$@")
FINETUNE=0
if ((SELFTEST)); then
  ENTRY=${ENTRY:-"-m megatron_hdpissa.launch --selftest"}
  ((${#ARGS[@]})) || ARGS=(--tensor-model-parallel-size 2 --out '{out}/result.json')
elif [[ -z $ENTRY ]]; then
  ENTRY="-m megatron_hdpissa.finetune"
  ((${#ARGS[@]})) && die "ARGS replace the default fine-tune flags only together with --entry"
  FINETUNE=1
  DIGEST=${DIGEST:-'{out}-ckpt'}
  IGNORE=${IGNORE:-tokens_per_s}
else
  ((${#ARGS[@]})) || die "--entry needs the command's ARGS after --"
fi
[[ $ITERS =~ ^[1-9][0-9]*$ ]] || die "--iters must be a positive integer"
read -r -a entry <<< "$ENTRY"

[[ $(id -u) == 0 ]] || die "needs root (apt-get, munged, slurmd); run it with sudo"
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
[[ -x $PYTHON ]] || die "no Python at $PYTHON (make venv, or --python PATH)"

# --- 1. packages -----------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi
say "$(slurmctld -V)"

# --- 2. work directory, clean-up -------------------------------------------------------------
WORK=$(mktemp -d /tmp/hdpissa-slurm-test.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK"/{state,spool,log}
MUNGED_PID="" CTLD_PID="" SLURMD_PID=""
JOBS=()

stop_pid() {  # stop_pid NAME PID: TERM, wait up to 10 s, then KILL
  local name=$1 pid=$2
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then echo "  $name ($pid) ignored SIGTERM; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  local rc=$?
  set +e
  for job in "${JOBS[@]}"; do scancel "$job" 2>/dev/null; done
  stop_pid slurmd "$SLURMD_PID"
  stop_pid slurmctld "$CTLD_PID"
  stop_pid munged "$MUNGED_PID"
  if ((KEEP)) || ((rc)); then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 3. material for the fine-tune: converted truncated SmolLM2, a GSM8K subset ---------------
if ((FINETUNE)); then
  t=$(now_ms)
  MAT=$WORK/material
  mkdir -p "$MAT"
  HF_DIR=$("$PYTHON" -c 'from megatron_hdpissa.data.material import smollm2_hf_dir; print(smollm2_hf_dir(num_layers=2))' \
           2>"$WORK/log/material.err" | tail -1) \
    || { cat "$WORK/log/material.err"; die "could not prepare SmolLM2 (make venv installs the material packages)"; }
  "$PYTHON" "$REPO/tools/convert_hf_to_megatron.py" --hf-dir "$HF_DIR" --save "$MAT/base" \
    --tensor-model-parallel-size 1 --no-progress >"$WORK/log/convert.out" 2>&1 \
    || { cat "$WORK/log/convert.out"; die "converting $HF_DIR failed"; }
  "$PYTHON" - "$MAT" <<'EOF' || die "could not write the GSM8K subset"
import sys
from pathlib import Path

from megatron_hdpissa.data.gsm8k import write_gsm8k_split
from megatron_hdpissa.data.material import gsm8k_test_path

mat = Path(sys.argv[1])
train, heldout = write_gsm8k_split(str(gsm8k_test_path()), str(mat / "gsm8k"))
for src, dst, n in ((train, "train.jsonl", 16), (heldout, "heldout.jsonl", 8)):
    (mat / dst).write_text("\n".join(Path(src).read_text().splitlines()[:n]) + "\n")
EOF
  # Every flag that shapes the result, identical for torchrun and both sbatch modes (they come
  # after the sbatch's own defaults, so they override them).
  ARGS=(
    --pretrained-checkpoint "$MAT/base" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$MAT/base/tokenizer"
    --data-path "$MAT/train.jsonl" --valid-data-path "$MAT/heldout.jsonl"
    --prompt-field question --response-field answer --prompt-template alpaca --seq-length 128
    --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --micro-batch-size 1 --global-batch-size 4
    --train-iters "$ITERS" --lr 1e-4 --min-lr 0 --lr-decay-style constant --lr-warmup-iters 0
    --weight-decay 0 --adam-beta1 0.9 --adam-beta2 0.999 --adam-eps 1e-8 --seed 1234 --nonfinite-loss stop
    --peft hd-pissa --hd-pissa-rank 4 --hd-pissa-alpha 4 --hd-pissa-target-modules linear_qkv,linear_proj,linear_fc1,linear_fc2
    --hd-pissa-svd exact --hd-pissa-virtual-ranks 1 --hd-pissa-check-interval 1
    --eval-interval 2 --eval-iters 0 --log-interval 1 --no-progress
    --log-json '{out}/log.jsonl' --save '{out}-ckpt' --save-interval 0 --exit-interval 0
  )
  say "material ready in $(secs "$t")s: $HF_DIR -> $MAT/base (TP 1); 16 training, 8 held-out GSM8K problems (--seq-length 128)"
fi

# --- 4. munge --------------------------------------------------------------------------------
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  say "munged already running: using it"
else
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --keyfile=/etc/munge/munge.key; chown munge:munge /etc/munge/munge.key; }
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  setpriv --reuid=munge --regid=munge --init-groups munged --foreground --force >"$WORK/log/munged.out" 2>&1 &
  MUNGED_PID=$!
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n | unmunge >/dev/null || die "munged did not come up: $(cat "$WORK/log/munged.out")"
  say "munged started (pid $MUNGED_PID)"
fi

# --- 5. slurm.conf and daemons ---------------------------------------------------------------
NODE=$(hostname -s)
getent hosts "$NODE" >/dev/null || die "this machine's name '$NODE' does not resolve; add it to /etc/hosts"
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
for port in "$CTLD_PORT" "$SLURMD_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use (another SLURM?); set SLURMCTLD_PORT / SLURMD_PORT"
  fi
done
# slurmd -C reports what slurmd will detect; declaring more would drain the node.
read -r CPUS MEM < <(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*RealMemory=\([0-9]*\).*/\1 \2/p')
((CPUS >= NTASKS)) || die "$NTASKS tasks need $NTASKS CPUs; slurmd sees $CPUS"
export SLURM_CONF=$WORK/slurm.conf
cat >"$SLURM_CONF" <<EOF
# Generated by tools/slurm_local_test.sh: a one-node cluster for a test, state under $WORK.
ClusterName=hdpissa-test
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$WORK/state
SlurmdSpoolDir=$WORK/spool
SlurmctldPidFile=$WORK/slurmctld.pid
SlurmdPidFile=$WORK/slurmd.pid
SlurmctldLogFile=$WORK/log/slurmctld.log
SlurmdLogFile=$WORK/log/slurmd.log
# No cgroups needed (containers and gVisor sandboxes often lack them).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$((MEM * 9 / 10)) State=UNKNOWN
PartitionName=test Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -D -f "$SLURM_CONF" >"$WORK/log/slurmctld.out" 2>&1 &
CTLD_PID=$!
slurmd -D -N "$NODE" -f "$SLURM_CONF" >"$WORK/log/slurmd.out" 2>&1 &
SLURMD_PID=$!
for _ in $(seq 150); do
  [[ $(sinfo -h -n "$NODE" -o %t 2>/dev/null) == idle ]] && break
  kill -0 "$CTLD_PID" 2>/dev/null || die "slurmctld exited: $(tail -5 "$WORK/log/slurmctld.log")"
  kill -0 "$SLURMD_PID" 2>/dev/null || die "slurmd exited: $(tail -5 "$WORK/log/slurmd.log")"
  sleep 0.2
done
[[ $(sinfo -h -n "$NODE" -o %t) == idle ]] || die "node $NODE not idle: $(sinfo -N -l)"
say "slurmctld (pid $CTLD_PID) and slurmd (pid $SLURMD_PID) up: node $NODE, $CPUS CPUs"

# The launcher's hostlist expander against SLURM's own (forms both accept).
SPECS=('node[01-04,07]' 'a-[1-2],b3' 'rack[1-2]-n[8-10]' 'x[098-100],y' 'n[1-010]' "$NODE")
for spec in "${SPECS[@]}"; do scontrol show hostnames "$spec" | tr '\n' ' '; echo; done >"$WORK/hostnames.scontrol"
"$PYTHON" -c 'import sys; from megatron_hdpissa.launch.environ import expand_hostlist as e
for spec in sys.argv[1:]: print(*e(spec), end=" \n")' "${SPECS[@]}" >"$WORK/hostnames.ours"
diff "$WORK/hostnames.scontrol" "$WORK/hostnames.ours" >&2 || die "hostlist expander disagrees with scontrol (left: scontrol)"
say "hostlist expander agrees with scontrol show hostnames"

with_out() {  # the ARGS with {out} replaced by $1
  local a
  OUT_ARGS=()
  for a in "${ARGS[@]}"; do OUT_ARGS+=("${a//\{out\}/$1}"); done
}

digest() {  # digest OUT: SHA-256 of every tensor in the *.pt files under --digest -> OUT/checkpoint_digest.json
  [[ -n $DIGEST ]] || return 0
  "$PYTHON" - "${DIGEST//\{out\}/$1}" "$1/checkpoint_digest.json" <<'EOF'
import hashlib
import json
import re
import sys
from pathlib import Path

import torch

root, out = Path(sys.argv[1]), Path(sys.argv[2])
# Python's own `random` state is seeded from the OS at start-up and unused by training; it is
# saved for resuming, so it differs between any two runs (legacy: /rng/python...; torch_dist:
# /training/rng/<dp,tp,pp>/python...). The run's own arguments (its --save, --log-json paths)
# are in a torch_dist checkpoint's common.pt and differ by construction.
SKIP = re.compile(r"^(/rng/python|/training/rng/[^/]+/python|/training/meta/args/)")


def leaves(obj, key=""):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        yield key, f"{t.dtype} {list(obj.shape)} {hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()}"
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from leaves(obj[k], f"{key}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{key}[{i}]")
    else:
        yield key, obj if isinstance(obj, (bool, int, float, str, type(None))) else repr(obj)


def digest(obj):
    return {k: v for k, v in leaves(obj) if not SKIP.match(k)}


files = sorted(root.rglob("*.pt"))
if not files:
    sys.exit(f"no *.pt checkpoint files under {root}")
tracker = root / "latest_checkpointed_iteration.txt"
result = {"latest_checkpointed_iteration": tracker.read_text().strip() if tracker.exists() else None,
          "files": {str(f.relative_to(root)): digest(torch.load(f, map_location="cpu", weights_only=True))
                    for f in files}}
for meta in sorted(root.glob("iter_*/metadata.json")):  # torch_dist: every sharded tensor, whole
    from megatron_hdpissa.checkpoint.safe_load import read_global_tensors

    result["files"][f"{meta.parent.name}/*.distcp"] = digest(read_global_tensors(meta.parent))
out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
print(f"{sum(len(v) for v in result['files'].values())} entries of {len(files)} files under {root}")
EOF
}

# --- 6. reference: the same command under torchrun -------------------------------------------
mkdir -p "$WORK/torchrun"
with_out "$WORK/torchrun"
t=$(now_ms)
(
  cd "$REPO"
  for v in $(compgen -e | grep '^SLURM_' || true); do unset "$v"; done
  CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone \
    --nproc-per-node "$NTASKS" "${entry[@]}" "${OUT_ARGS[@]}"
) >"$WORK/log/torchrun.out" 2>&1 || { tail -30 "$WORK/log/torchrun.out"; die "the torchrun reference run failed"; }
say "torchrun reference done in $(secs "$t")s"
if ((FINETUNE)); then
  losses=$("$PYTHON" - "$WORK/torchrun/log.jsonl" "$ITERS" <<'EOF'
import json
import math
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
losses = [r["loss"] for r in rows if "loss" in r]
if len(losses) != int(sys.argv[2]) or not all(math.isfinite(x) for x in losses):
    sys.exit(f"expected {sys.argv[2]} finite losses in {sys.argv[1]}, got {rows}")
print(" ".join(f"{x:.6f}" for x in losses))
EOF
  ) || die "the torchrun reference logged no usable losses"
  say "torchrun reference losses: $losses"
fi
digest "$WORK/torchrun" >"$WORK/log/digest-torchrun.out" 2>&1 \
  || { cat "$WORK/log/digest-torchrun.out"; die "digesting the torchrun checkpoint failed"; }
[[ -z $DIGEST ]] || say "torchrun checkpoint digested: $(cat "$WORK/log/digest-torchrun.out")"

# --- 7. the sbatch example, per launch mode --------------------------------------------------
FAILED=0
for mode in $MODES; do
  out=$WORK/slurm-$mode
  mkdir -p "$out"
  with_out "$out"
  t=$(now_ms)
  job=$(sbatch --parsable --chdir="$REPO" --job-name="hdpissa-test-$mode" --output="$WORK/log/job-$mode-%j.out" \
        --nodes=1 --ntasks-per-node="$NTASKS" --cpus-per-task=1 --gpus-per-node=0 \
        --time=$(((TIMEOUT + 59) / 60)) \
        --export=ALL,HDPISSA_DEVICE=cpu,HDPISSA_LAUNCH_MODE="$mode",HDPISSA_PYTHON="$PYTHON",HDPISSA_ENTRY="$ENTRY" \
        "$REPO/examples/slurm/finetune_hdpissa.sbatch" "${OUT_ARGS[@]}")
  JOBS+=("$job")
  state=""
  deadline=$(($(date +%s) + TIMEOUT))
  while (($(date +%s) < deadline)); do
    state=$(scontrol -o show job "$job" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    case $state in PENDING|RUNNING|CONFIGURING|COMPLETING|"") sleep 0.5 ;; *) break ;; esac
  done
  case $state in PENDING|RUNNING|CONFIGURING|COMPLETING|"") scancel "$job"; state="TIMEOUT (test, ${TIMEOUT}s)" ;; esac
  say "mode $mode: job $job $state in $(secs "$t")s"
  if [[ $state != COMPLETED ]]; then
    echo "---- job output ($WORK/log/job-$mode-$job.out) ----"; tail -40 "$WORK/log/job-$mode-$job.out" || true
    FAILED=1
    continue
  fi
  if ! digest "$out" >"$WORK/log/digest-$mode.out" 2>&1; then
    cat "$WORK/log/digest-$mode.out"; FAILED=1; continue
  fi
  read -r -a ignore <<< "$IGNORE"
  "$PYTHON" "$REPO/tools/compare_results.py" "$WORK/torchrun" "$out" --rtol "$RTOL" \
    ${ignore[@]+--ignore "${ignore[@]}"} || FAILED=1
done

if ((FAILED)); then die "FAILED (logs in $WORK/log)"; fi
say "PASSED: sbatch modes [$MODES] agree with torchrun ($ENTRY)"
