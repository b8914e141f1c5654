#!/usr/bin/env bash
# Run examples/slurm/finetune_hdpissa.sbatch on a throw-away one-node SLURM cluster on this
# machine (CPU/gloo, 2 tasks) and compare its result files with the same command under torchrun.
#
#   sudo tools/slurm_local_test.sh [options] [-- ARGS...]
#
# Options:
#   --python PATH     Python with megatron_hdpissa installed (default: REPO/.venv/bin/python)
#   --entry "CMD"     what each rank runs (default: "-m megatron_hdpissa.launch --selftest")
#   --modes "M ..."   launch modes of the sbatch to test (default: "task node")
#   --timeout SEC     per job (default: 300)
#   --ignore "K ..."  result keys not compared (timings, paths)
#   --rtol R          relative tolerance for numbers (default: 0, exact)
#   --keep            keep the work directory (logs, slurm.conf, results)
# ARGS go to every run of the command; {out} is replaced by that run's own output directory,
# where it must write its *.json / *.jsonl results. Default:
#   --tensor-model-parallel-size 2 --out {out}/result.json
#
# Needs root: it installs slurmctld, slurmd, slurm-client and munge with apt-get if missing,
# starts munged (unless one answers already), slurmctld and slurmd in the foreground as
# children of this script, and on exit stops exactly those PIDs.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=$REPO/.venv/bin/python
ENTRY="-m megatron_hdpissa.launch --selftest"
MODES="task node"
TIMEOUT=300
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
    --entry) ENTRY=$2; shift 2 ;;
    --modes) MODES=$2; shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    --ignore) IGNORE=$2; shift 2 ;;
    --rtol) RTOL=$2; shift 2 ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
ARGS=("$@")
((${#ARGS[@]})) || ARGS=(--tensor-model-parallel-size 2 --out '{out}/result.json')
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

# --- 3. munge --------------------------------------------------------------------------------
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

# --- 4. slurm.conf and daemons ---------------------------------------------------------------
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
"$PYTHON" -c 'import sys; from megatron_hdpissa.launch import expand_hostlist as e
for spec in sys.argv[1:]: print(*e(spec), end=" \n")' "${SPECS[@]}" >"$WORK/hostnames.ours"
diff "$WORK/hostnames.scontrol" "$WORK/hostnames.ours" >&2 || die "hostlist expander disagrees with scontrol (left: scontrol)"
say "hostlist expander agrees with scontrol show hostnames"

with_out() {  # the ARGS with {out} replaced by $1
  local a
  OUT_ARGS=()
  for a in "${ARGS[@]}"; do OUT_ARGS+=("${a//\{out\}/$1}"); done
}

# --- 5. reference: the same command under torchrun -------------------------------------------
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

# --- 6. the sbatch example, per launch mode --------------------------------------------------
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
  read -r -a ignore <<< "$IGNORE"
  "$PYTHON" "$REPO/tools/compare_results.py" "$WORK/torchrun" "$out" --rtol "$RTOL" \
    ${ignore[@]+--ignore "${ignore[@]}"} || FAILED=1
done

if ((FAILED)); then die "FAILED (logs in $WORK/log)"; fi
say "PASSED: sbatch modes [$MODES] agree with torchrun"
