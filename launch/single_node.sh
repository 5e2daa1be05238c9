#!/usr/bin/env bash
# Train on this machine with torchrun: one process per visible GPU, or 2 CPU processes (gloo) without GPUs.
#
#   launch/single_node.sh [--strategy ddp|trainer|fabric] [--nproc N] [-- config args]
#
#   launch/single_node.sh                                   # ddp, configs/default.yaml, all visible GPUs
#   launch/single_node.sh --strategy fabric -- -c fashion optim.lr=0.1
#   launch/single_node.sh --nproc 4 -- -c smoke run.dir=runs/smoke4
#   CUDA_VISIBLE_DEVICES=2,3 launch/single_node.sh --strategy trainer -- -c fashion
#   launch/single_node.sh --strategy fabric -- -c fashion train.parallel=fsdp   # sharded (FSDP2), not DDP
#
# --strategy  ddp (default), trainer or fabric: `python -m distmnist.<strategy>` under torchrun
# --nproc     processes; default: the number of visible GPUs (CUDA_VISIBLE_DEVICES if set, else
#             `nvidia-smi -L`), or 2 on a machine without GPUs (then give train.accelerator=cpu or auto)
# --          everything after it goes to distmnist unchanged: [-c CONFIG] [-q] [section.key=value ...]
#             (the -- may be left out: the first argument that is none of the options above starts them)
#
# Several launches can share a machine: each uses `torchrun --standalone`, whose rendezvous store binds a port
# the kernel picks (no port to choose, no race between two jobs). OMP_NUM_THREADS defaults to the CPU
# cores divided by the processes. SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) is passed on to the training processes:
# every process checkpoints at the next agreed step boundary and stops, and rank 0 says so in one line; run the
# same command again to resume. A second Ctrl-C ends them at once (no new checkpoint).
# torchrun runs as distmnist.tools.torchrun, which ends with its workers' code and one line instead of torchrun's
# traceback and failure summary. Exit code: 0 done, 2 a usage error (this script's or distmnist's, one line),
# 3 diverged, 69 start-up incomplete, 1 a process failed (torchrun's summary), or 128+signal after a passed-on
# signal (130 SIGINT, 143 SIGTERM, 138 SIGUSR1).
#
# Another number of processes, the same run: give the run a global batch (data.global_batch_size) and resume its
# run.dir with any --nproc that divides it (data.batch_size x processes x train.accumulate_grad_batches must equal it;
# the accumulation is derived when not given): the samples, steps and learning rates are the same
# (docs/elastic.md).
#   launch/single_node.sh --nproc 2 -- -c smoke data.global_batch_size=192 data.batch_size=96 run.dir=runs/g192
#   launch/single_node.sh --nproc 3 -- -c smoke data.global_batch_size=192 data.batch_size=64 run.dir=runs/g192
# Elastic (torchrun itself, not this script): one agent per node, the world shrinks when a node is lost and grows
# when one joins; each restart resumes from the newest checkpoint:
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nnodes=1:2 --nproc_per_node=1 --max-restarts=3 \
#     --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --rdzv-id=JOB -m distmnist.ddp -c smoke \
#     data.global_batch_size=192 data.batch_size=96 run.dir=runs/elastic
set -uo pipefail

prog="single_node.sh"
usage() { sed -n '2,/^set -/{/^set -/!p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "$prog: error: $* (see $prog --help)" >&2; exit 2; }

strategy="ddp"
nproc=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --strategy) [ $# -ge 2 ] || die "--strategy needs a value"; strategy="$2"; shift 2 ;;
        --strategy=*) strategy="${1#*=}"; shift ;;
        --nproc | --nproc-per-node | --nproc_per_node)
            [ $# -ge 2 ] || die "$1 needs a value"; nproc="$2"; shift 2 ;;
        --nproc=* | --nproc-per-node=* | --nproc_per_node=*) nproc="${1#*=}"; shift ;;
        --) shift; break ;;
        *) break ;; # config args without the --: fine too (checked below, by distmnist itself)
    esac
done
case "$strategy" in
    ddp | trainer | fabric) ;;
    *) die "unknown strategy '$strategy': choose ddp, trainer or fabric" ;;
esac

visible_gpus() { # number of GPUs this process may use
    if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
        local list="${CUDA_VISIBLE_DEVICES// /}" n=0 item
        [ "$list" = "-1" ] && { echo 0; return; }
        IFS=, read -r -a items <<< "$list"
        for item in "${items[@]}"; do [ -n "$item" ] && n=$((n + 1)); done
        echo "$n"
    elif command -v nvidia-smi > /dev/null 2>&1; then
        nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true
    else
        echo 0
    fi
}

# The config args, read by distmnist itself exactly as its processes will (one line and exit 2 on a mistake),
# before torchrun starts any process.
check='import sys; from distmnist.core.args import launch_check; sys.exit(launch_check(sys.argv[1], sys.argv[2:]))'
"${PYTHON:-python}" -c "$check" "$strategy" "$@" > /dev/null || exit $?

gpus="$(visible_gpus)"
if [ -z "$nproc" ]; then
    if [ "$gpus" -gt 0 ]; then nproc="$gpus"; else nproc=2; fi
fi
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc must be a positive integer, got '$nproc'"

if [ -z "${OMP_NUM_THREADS:-}" ]; then
    cores="$(nproc 2> /dev/null || echo 1)"
    OMP_NUM_THREADS=$((cores / nproc))
    [ "$OMP_NUM_THREADS" -ge 1 ] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS
export PYTHONUNBUFFERED=1

if [ "$gpus" -gt 0 ]; then device="$gpus GPU(s) visible"; else device="no GPU: CPU with gloo"; fi
echo "$prog: strategy=$strategy processes=$nproc ($device) OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2

stopped_by=0 pid=""
workers() { pgrep -P "$pid" 2> /dev/null; } # torchrun's children: the training processes
forward() { # signal name, number
    if [ "$stopped_by" != 0 ]; then
        # once is enough, but a second Ctrl-C is a user who wants out now: the processes quit at once
        [ "$1" = INT ] || return 0
        echo "$prog: second Ctrl-C: ending the training processes now, without a new checkpoint" >&2
        kill -INT $(workers) 2> /dev/null
        return 0
    fi
    stopped_by=$2
    [ -n "$pid" ] || return 0
    # straight to the training processes, which all stop at the same agreed step (not through torchrun, whose
    # agent would answer with its traceback, and dies of SIGUSR1); none yet: torchrun passes a SIGTERM on
    local procs
    procs="$(workers)"
    if [ -n "$procs" ]; then kill -"$1" $procs 2> /dev/null; else kill -TERM "$pid" 2> /dev/null; fi
}
trap 'forward INT 2' INT
trap 'forward TERM 15' TERM
trap 'forward USR1 10' USR1

# torchrun runs in a process group of its own (job control), and its workers each in a session of their own, so a
# Ctrl-C at the terminal reaches only this script, which passes it on to the workers as one SIGINT.
# torchrun starts with SIGUSR1 ignored: it would die of it, leaving its workers without a checkpoint.
set -m
(
    trap '' USR1
    exec "${PYTHON:-python}" -m distmnist.tools.torchrun --standalone --nnodes=1 --nproc_per_node="$nproc" \
        --max_restarts=0 -m "distmnist.$strategy" "$@"
) &
pid=$!
set +m
[ "$stopped_by" = 0 ] || kill -TERM "$pid" 2> /dev/null

while :; do
    wait "$pid"
    rc=$?
    # `wait` also returns when a trapped signal arrives: go on waiting while torchrun runs
    kill -0 "$pid" 2> /dev/null || break
done
if [ "$stopped_by" != 0 ]; then
    # 75 (SIGTERM, SIGUSR1) and 130 (SIGINT): rank 0 has said where it stopped and how to resume
    if [ "$rc" != 75 ] && [ "$rc" != 130 ]; then
        echo "$prog: stopped (torchrun exit $rc); run the same command again to resume from the newest checkpoint" >&2
    fi
    exit $((128 + stopped_by))
fi
exit "$rc"
