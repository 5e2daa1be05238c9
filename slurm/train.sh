#!/usr/bin/env bash
# ---- resources: edit them here, or override any of them on the sbatch command line ----------------------------
#SBATCH --job-name=distmnist
#SBATCH --nodes=1                     # N nodes
#SBATCH --ntasks-per-node=1           # ddp, fabric: 1 (one torchrun per node starts the node's processes)
#                                     # trainer: = GPUs per node (one SLURM task per GPU process)
#SBATCH --gpus-per-node=4             # G GPUs per node; CPU-only: sbatch --gpus-per-node=0 (or delete the line)
#SBATCH --cpus-per-task=8             # cores per task (ddp/fabric: shared by the node's G processes)
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out      # one log per job (%x job name, %j job id), stdout and stderr together,
#SBATCH --error=slurm-%x-%j.out       #   appended to by every restart of the job
#SBATCH --open-mode=append
#SBATCH --requeue                     # the job may be requeued (preemption, or by itself before its time limit)
#SBATCH --signal=B:USR1@120           # 120 s before the time limit SLURM sends SIGUSR1 to this script (B: the
#                                     # batch shell only -- never to torchrun, which dies of it): checkpoint, requeue
# ----------------------------------------------------------------------------------------------------------------
# Train distmnist on N nodes x G GPUs (or CPUs) with SLURM.
#
#   sbatch slurm/train.sh [--strategy ddp|trainer|fabric] [-c CONFIG] [section.key=value ...]
#
#   sbatch slurm/train.sh -c fashion                                    # 1 node x 4 GPUs, raw DDP
#   sbatch --nodes=2 slurm/train.sh --strategy fabric -c fashion        # 2 nodes x 4 GPUs, Fabric
#   sbatch --ntasks-per-node=4 slurm/train.sh --strategy trainer -c fashion   # Lightning Trainer, 1 task per GPU
#   DISTMNIST_STRATEGY=fabric sbatch slurm/train.sh -c fashion          # strategy from the environment
#   sbatch --gpus-per-node=0 slurm/train.sh -c fashion                  # CPU only, 2 gloo processes per node
#   sbatch slurm/train.sh -c fashion train.parallel=fsdp                # sharded (FSDP2); run.dir on a shared FS
#
# Activate the Python environment that has distmnist before sbatch: the job inherits it. Submit from where the
# run directories should go: the job works in the submission directory.
#
# Strategy: `--strategy X` as the first argument, else $DISTMNIST_STRATEGY, else ddp.
#   ddp, fabric  srun starts one task per node running slurm/torchrun_node.sh: torchrun with --nnodes=N,
#                --nproc_per_node=G and a c10d rendezvous on the first node of the job at a port derived from the
#                job id (10000 + job id % 20000; DISTMNIST_RDZV_PORT overrides).
#   trainer      srun starts one task per process (--ntasks-per-node = G); Lightning's SLURM environment reads
#                them; MASTER_ADDR/MASTER_PORT (first node, the same derived port) are exported.
# Processes per node: the GPUs of the job on this node; without GPUs (CPU-only, gloo) DISTMNIST_NPROC_PER_NODE,
# default 2. OMP_NUM_THREADS (unless set) = cores per task / processes per task.
#
# Run directory: runs/<job name>-<job id> under the submission directory, unless run.dir is given (as an
# argument or in the config file). A requeued job keeps its id, so it finds its own checkpoints and resumes.
#
# Preemption and time limit: on SIGUSR1 (the --signal above, or `scancel --signal=USR1 --batch <job>`) this script
# passes the signal on to the training processes; every rank writes a checkpoint at the same step boundary and exits
# (code 75); then the job requeues itself (`scontrol requeue`) and, started again (SLURM_RESTART_COUNT >= 1),
# resumes from that checkpoint. On SIGTERM (scancel, preemption, the time limit itself) SLURM has signalled the
# training processes already: the script waits for their checkpoint and exits; it does not requeue.
# With data.global_batch_size set, a requeued or resubmitted job may have another number of nodes or GPUs (any
# count that divides the global batch; data.batch_size x processes x train.accumulate_grad_batches must equal it,
# the accumulation derived when not given): it resumes exactly, e.g. run.dir=runs/g512 data.global_batch_size=512
# data.batch_size=64 on 2 nodes x 4 GPUs, then the same on 1 node x 4 GPUs (accumulation 2). Without it, another
# process count is refused (exit 2, one line). For torchrun's own elastic restarts (--nnodes=MIN:MAX: survivors
# re-rendezvous after a node loss) see launch/single_node.sh and docs/elastic.md.
# A job requeues itself at most DISTMNIST_MAX_REQUEUES times (default 10; as submitit's slurm_max_num_timeout), and
# never after a usage error (exit 2) or a diverged run (exit 3): a run that cannot make progress does not requeue
# forever.
#
# Mistakes fail within seconds, with one line in the log and exit code 2: an unknown strategy, a bad config
# (missing file, unknown key, bad value), train.accelerator=cuda without GPUs, task and GPU counts that do not
# fit the strategy (trainer: --ntasks-per-node must equal the GPUs per node; ddp/fabric: --ntasks-per-node=1).
set -uo pipefail

prog="slurm/train.sh"
say() { echo "distmnist-slurm: $*"; }
fail() { echo "distmnist-slurm: error: $*" >&2; exit 2; }

# ---- arguments ---------------------------------------------------------------------------------------------------
strategy="${DISTMNIST_STRATEGY:-ddp}"
case "${1:-}" in
    -h | --help) sed -n '2,/^set -uo pipefail/{/^set -uo pipefail/!p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --strategy) [ $# -ge 2 ] || fail "--strategy needs a value: ddp, trainer or fabric"; strategy="$2"; shift 2 ;;
    --strategy=*) strategy="${1#*=}"; shift ;;
esac
case "$strategy" in
    ddp | trainer | fabric) ;;
    *) fail "unknown strategy '$strategy': choose ddp, trainer or fabric (--strategy X or DISTMNIST_STRATEGY=X)" ;;
esac
args=("$@")

[ -n "${SLURM_JOB_ID:-}" ] || fail "not inside a SLURM job: submit it with sbatch $prog [config args]"

PYTHON="$(command -v "${PYTHON:-python}" 2> /dev/null)" ||
    fail "no python on PATH: activate the environment that has distmnist before sbatch"

# ---- the config: checked here (one line and exit 2 on a mistake), before any process is started -----------------
# (distmnist.core.args.launch_check) prints: train.accelerator <TAB> run.dir if the arguments or the config set it
config_facts="$("$PYTHON" - "$strategy" "${args[@]}" << 'PY'
import sys

try:
    from distmnist.core.args import launch_check  # parses the args as `python -m distmnist.<strategy>` does
except ImportError as err:
    print(f"distmnist-slurm: error: cannot import distmnist with {sys.executable} ({err}); activate its "
          f"environment before sbatch", file=sys.stderr)
    sys.exit(2)
sys.exit(launch_check(sys.argv[1], sys.argv[2:]))
PY
)" || exit $?
IFS=$'\t' read -r accelerator run_dir <<< "$config_facts"

# ---- the job's shape ---------------------------------------------------------------------------------------------
nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"

count_list() { # comma-separated list -> number of non-empty items
    local n=0 item
    IFS=, read -r -a items <<< "${1// /}"
    for item in "${items[@]}"; do [ -n "$item" ] && n=$((n + 1)); done
    echo "$n"
}
gpus_on_node() { # GPUs this job may use on this node
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [ -n "${SLURM_JOB_GPUS:-}" ]; then
        count_list "$SLURM_JOB_GPUS"
    elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "-1" ]; then
        count_list "$CUDA_VISIBLE_DEVICES"
    elif command -v nvidia-smi > /dev/null 2>&1; then # a cluster that does not schedule GPUs as GRES
        nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}
gpus="$(gpus_on_node)"
[[ "$gpus" =~ ^[0-9]+$ ]] || gpus=0

tasks_per_node() { # the tasks per node of the job if the same on every node, else empty
    local spec="${SLURM_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}" first="" item count
    IFS=, read -r -a items <<< "$spec"
    for item in "${items[@]}"; do # "2(x3)" or "2"
        count="${item%%(*}"
        [ -z "$first" ] && first="$count"
        [ "$count" = "$first" ] || { echo ""; return; }
    done
    echo "$first"
}
tpn="$(tasks_per_node)"

if [ "$accelerator" = cuda ] && [ "$gpus" = 0 ]; then
    fail "train.accelerator=cuda but this job has no GPUs: submit with --gpus-per-node=N, or use train.accelerator=cpu"
fi
uses_gpus=0
[ "$gpus" -gt 0 ] && [ "$accelerator" != cpu ] && uses_gpus=1
cpu_nproc="${DISTMNIST_NPROC_PER_NODE:-2}"
[[ "$cpu_nproc" =~ ^[1-9][0-9]*$ ]] || fail "DISTMNIST_NPROC_PER_NODE must be a positive integer, got '$cpu_nproc'"

if [ "$strategy" = trainer ]; then
    [ -n "$tpn" ] || fail "the trainer needs the same number of tasks on every node (SLURM_TASKS_PER_NODE=${SLURM_TASKS_PER_NODE:-}): submit with --ntasks-per-node=N"
    if [ "$uses_gpus" = 1 ] && [ "$tpn" != "$gpus" ]; then
        fail "the Lightning Trainer runs one SLURM task per GPU, but this job has $tpn task(s) and $gpus GPU(s) per node: submit with --ntasks-per-node=$gpus"
    fi
    if [ "$uses_gpus" = 0 ] && [ -n "${DISTMNIST_NPROC_PER_NODE:-}" ] && [ "$tpn" != "$DISTMNIST_NPROC_PER_NODE" ]; then
        fail "DISTMNIST_NPROC_PER_NODE=$DISTMNIST_NPROC_PER_NODE but the trainer runs one process per task and this job has $tpn task(s) per node: submit with --ntasks-per-node=$DISTMNIST_NPROC_PER_NODE"
    fi
    nproc="$tpn"
else
    if [ "$tpn" != 1 ]; then
        fail "$strategy runs one torchrun per node, which starts the node's processes itself, but this job has ${tpn:-uneven} task(s) per node: submit with --ntasks-per-node=1"
    fi
    if [ "$uses_gpus" = 1 ]; then
        nproc="${DISTMNIST_NPROC_PER_NODE:-$gpus}"
        [ "$nproc" -le "$gpus" ] ||
            fail "DISTMNIST_NPROC_PER_NODE=$nproc but this job has only $gpus GPU(s) per node: at most one process per GPU"
    else
        nproc="$cpu_nproc"
    fi
fi
world=$((nnodes * nproc))

# threads per process: the task's cores shared by the processes the task runs
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    per_task=1
    [ "$strategy" = trainer ] || per_task="$nproc"
    OMP_NUM_THREADS=$(("${SLURM_CPUS_PER_TASK:-1}" / per_task))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS PYTHONUNBUFFERED=1
# SLURM 22.05 to 23.02: srun does not inherit --cpus-per-task from sbatch unless told so
[ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"

# ---- where: run directory, rendezvous ----------------------------------------------------------------------------
if [ -z "$run_dir" ]; then
    job_name="${SLURM_JOB_NAME:-distmnist}"
    run_dir="$PWD/runs/${job_name//[^A-Za-z0-9._-]/_}-$SLURM_JOB_ID"
    args+=("run.dir=$run_dir")
    # a first start finds its job's run dir empty; one that exists was left by another job with the same id
    # (a cluster whose job ids started over) and must not be resumed by accident
    if [ "${SLURM_RESTART_COUNT:-0}" = 0 ] && [ -e "$run_dir" ]; then
        fail "$run_dir already exists, left by an earlier job with the same id: pass run.dir=$run_dir to resume it, or move it away"
    fi
fi
head_node="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2> /dev/null | head -n 1)"
[ -n "$head_node" ] || head_node="$(hostname)"
port="${DISTMNIST_RDZV_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
[[ "$port" =~ ^[0-9]+$ ]] || fail "DISTMNIST_RDZV_PORT must be a port number, got '$port'"
restarts="${SLURM_RESTART_COUNT:-0}"
max_requeues="${DISTMNIST_MAX_REQUEUES:-10}"
[[ "$max_requeues" =~ ^[0-9]+$ ]] || fail "DISTMNIST_MAX_REQUEUES must be a number of requeues (0 or more), got '$max_requeues'"

# ddp, fabric: slurm/torchrun_node.sh must be readable on every node; it is found next to the submitted script
# (or in $DISTMNIST_HOME/slurm), not in SLURM's private copy of this script
helper=""
if [ "$strategy" != trainer ]; then
    submitted="$(scontrol show job "$SLURM_JOB_ID" 2> /dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p' | head -n 1)"
    for dir in ${DISTMNIST_HOME:+"$DISTMNIST_HOME/slurm"} ${submitted:+"$(dirname "$submitted")"} \
        "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-.}/slurm"; do
        if [ -f "$dir/torchrun_node.sh" ]; then helper="$dir/torchrun_node.sh"; break; fi
    done
    [ -n "$helper" ] ||
        fail "cannot find slurm/torchrun_node.sh next to the submitted script: set DISTMNIST_HOME=<the distmnist checkout>"
fi

if [ "$uses_gpus" = 1 ]; then device="$gpus GPU(s) per node"; else device="CPU, gloo"; fi
say "strategy=$strategy nodes=$nnodes processes=$world ($nproc per node, $device) run.dir=$run_dir" \
    "restart=$restarts job=$SLURM_JOB_ID rendezvous=$head_node:$port"

# ---- preemption / time limit -------------------------------------------------------------------------------------
# SIGUSR1: passed on to every process of the job step (`scancel --signal=USR1 <job>`, the batch shell excluded):
# Trainer tasks stop on it themselves; torchrun_node.sh turns it into one SIGTERM for its torchrun agent (which
# ignores SIGUSR1 itself) and the agent forwards that to its workers. It is sent again every 10 s while the step
# runs (harmless: every receiver acts on the first one only), in case the step had not started yet. Once the
# processes have checkpointed and exited, the job requeues itself.
# SIGTERM: SLURM has sent it to the job step as well (scancel, preemption, time limit): wait, do not requeue.
# Never `scancel --signal=TERM` here (SLURM takes it for a cancellation: srun returns at once and the tasks are
# killed KillWait later, mid-checkpoint), nor `kill srun` (srun aborts the step).
stop="" step="" resender=""
pass_usr1_on() {
    while :; do
        scancel --signal=USR1 "$SLURM_JOB_ID" 2> /dev/null
        sleep 10
    done
}
on_usr1() {
    [ -z "$stop" ] || return 0
    stop=USR1
    say "got SIGUSR1 (preemption or time limit ahead): checkpointing at the next step boundary, then requeueing"
    [ -z "$step" ] && return 0 # the training has not started: it will not be
    pass_usr1_on &
    resender=$!
}
on_term() {
    [ -z "$stop" ] || return 0
    stop=TERM
    say "got SIGTERM: the training processes checkpoint at the next step boundary and stop"
}
trap on_usr1 USR1
trap on_term TERM

# ---- launch, wait ------------------------------------------------------------------------------------------------
rc=75
if [ -z "$stop" ]; then
    if [ "$strategy" = trainer ]; then
        export MASTER_ADDR="$head_node" MASTER_PORT="$port"
        # each task prints its rank and hostname, then becomes `python -m distmnist.trainer`
        srun --nodes="$nnodes" --ntasks=$((nnodes * tpn)) --ntasks-per-node="$tpn" --kill-on-bad-exit=1 \
            bash -c 'echo "distmnist-slurm: rank $SLURM_PROCID of $SLURM_NTASKS on $(hostname) (node rank $SLURM_NODEID, local rank $SLURM_LOCALID)" >&2; exec "$0" -m distmnist.trainer "$@"' \
            "$PYTHON" "${args[@]}" &
    else
        srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
            bash "$helper" --strategy "$strategy" --nnodes "$nnodes" --nproc-per-node "$nproc" \
            --rdzv-endpoint "$head_node:$port" --rdzv-id "distmnist-$SLURM_JOB_ID" -- "${args[@]}" &
    fi
    step=$!
    while :; do
        wait "$step"
        rc=$?
        kill -0 "$step" 2> /dev/null || break # `wait` returns early when a trapped signal arrives
    done
    [ -z "$resender" ] || kill "$resender" 2> /dev/null
fi

# ---- requeue if asked to -----------------------------------------------------------------------------------------
if [ "$stop" = USR1 ] && [ -z "$step" ]; then
    # a job that requeues itself before training would do so again and again
    fail "SIGUSR1 arrived before the training started ($SECONDS s into the job): not requeueing; is the warning time of --signal=B:USR1@<seconds> shorter than --time?"
fi
# exit 75 from the Trainer's tasks; torchrun, stopped by its SIGTERM, exits 1 whatever its workers did. A usage
# error (2) or a diverged run (3) is never requeued: it would fail again
requeue=""
if [ "$stop" = USR1 ] && [ "$rc" != 0 ] && [ "$rc" != 2 ] && [ "$rc" != 3 ]; then requeue=1; fi
if [ -n "$requeue" ] && [ "$restarts" -ge "$max_requeues" ]; then
    say "stopped (exit $rc) after $restarts requeue(s), the limit (DISTMNIST_MAX_REQUEUES=$max_requeues): not requeueing; resubmit with run.dir=$run_dir to resume"
    exit "$rc"
fi
if [ -n "$requeue" ]; then
    trap '' TERM USR1 # the requeue sends SIGTERM to this script
    [ "$SECONDS" -ge 2 ] || sleep 2 # SLURM refuses to requeue a job in its first second
    if scontrol requeue "$SLURM_JOB_ID"; then
        say "stopped (exit $rc); requeued job $SLURM_JOB_ID: it resumes from the newest checkpoint in $run_dir"
        exit 0
    fi
    say "scontrol requeue $SLURM_JOB_ID failed; resubmit with run.dir=$run_dir to resume"
fi
if [ "$rc" = 0 ]; then
    say "done: $run_dir"
elif [ -n "$stop" ] || [ "$rc" = 75 ]; then
    say "stopped (exit $rc); resubmit with run.dir=$run_dir to resume from its newest checkpoint"
else
    say "training failed with exit code $rc (the lines above say why)"
fi
exit "$rc"
