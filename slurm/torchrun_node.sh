#!/usr/bin/env bash
# One node's share of a multi-node torchrun job: start this node's torchrun agent, which joins the c10d
# rendezvous at ENDPOINT and starts NPROC training processes (ranks are assigned by the rendezvous).
#
#   slurm/torchrun_node.sh --strategy ddp|trainer|fabric --nnodes N --nproc-per-node P \
#                          --rdzv-endpoint HOST:PORT --rdzv-id ID [-- config args]
#
# slurm/train.sh runs it once per node (`srun --ntasks-per-node=1`); it works the same by hand, without SLURM:
# run it on every node (or N times on one machine, as the tests do) with the same endpoint and id.
# The agent that finds HOST to be its own machine hosts the rendezvous store (with several agents on one
# machine, the first to bind the port). Config args go to `python -m distmnist.<strategy>` unchanged.
#
# Signals: SIGUSR1 or SIGTERM sent to this script makes it send one SIGTERM to the torchrun agent, which passes
# it to its workers: they checkpoint at the next agreed step boundary and exit 75 (the agent then exits 1).
# The agent itself ignores SIGUSR1 (torchrun would die of it, leaving its workers without a checkpoint).
# Inside an srun step SLURM delivers a job-step signal to every process of the step, the agent included, so a
# SIGTERM is not passed on a second time (a second SIGTERM would make the agent quit before its workers finish).
set -euo pipefail

prog="torchrun_node.sh"
usage() { sed -n '2,/^set -/{/^set -/!p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "$prog: error: $*" >&2; exit 2; }

strategy="" nnodes="" nproc="" endpoint="" rdzv_id=""
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --strategy) [ $# -ge 2 ] || die "--strategy needs a value"; strategy="$2"; shift 2 ;;
        --strategy=*) strategy="${1#*=}"; shift ;;
        --nnodes) [ $# -ge 2 ] || die "--nnodes needs a value"; nnodes="$2"; shift 2 ;;
        --nnodes=*) nnodes="${1#*=}"; shift ;;
        --nproc-per-node) [ $# -ge 2 ] || die "--nproc-per-node needs a value"; nproc="$2"; shift 2 ;;
        --nproc-per-node=*) nproc="${1#*=}"; shift ;;
        --rdzv-endpoint) [ $# -ge 2 ] || die "--rdzv-endpoint needs a value"; endpoint="$2"; shift 2 ;;
        --rdzv-endpoint=*) endpoint="${1#*=}"; shift ;;
        --rdzv-id) [ $# -ge 2 ] || die "--rdzv-id needs a value"; rdzv_id="$2"; shift 2 ;;
        --rdzv-id=*) rdzv_id="${1#*=}"; shift ;;
        --) shift; break ;;
        *) die "unknown option '$1' (config args go after --; see $prog --help)" ;;
    esac
done
case "$strategy" in
    ddp | trainer | fabric) ;;
    "") die "--strategy is required: ddp, trainer or fabric" ;;
    *) die "unknown strategy '$strategy': choose ddp, trainer or fabric" ;;
esac
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, got '$nnodes'"
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "--nproc-per-node must be a positive integer, got '$nproc'"
[[ "$endpoint" =~ ^[^:]+:[0-9]+$ ]] || die "--rdzv-endpoint must be HOST:PORT, got '$endpoint'"
[ -n "$rdzv_id" ] || die "--rdzv-id is required (the same on every node, e.g. the SLURM job id)"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export PYTHONUNBUFFERED=1

agent="" stopping=0 pending=0
stop_agent() { # signal name
    [ "$stopping" = 0 ] || return 0
    stopping=1
    if [ "$1" = TERM ] && [ -n "${SLURM_STEP_ID:-}" ]; then
        return 0 # the job step's SIGTERM reached the agent already
    fi
    echo "$prog: got SIG$1: SIGTERM to torchrun; its workers checkpoint and stop" >&2
    if [ -n "$agent" ]; then kill -TERM "$agent" 2> /dev/null || true; else pending=1; fi
}
trap 'stop_agent USR1' USR1
trap 'stop_agent TERM' TERM
trap 'stop_agent INT' INT

# `python -m torch.distributed.run` is torchrun from the same environment as distmnist. It starts with SIGUSR1
# ignored (an ignored signal stays ignored across exec; the workers install their own handler for it).
(
    trap '' USR1
    exec "${PYTHON:-python}" -m torch.distributed.run \
        --nnodes="$nnodes" \
        --nproc_per_node="$nproc" \
        --rdzv_backend=c10d \
        --rdzv_endpoint="$endpoint" \
        --rdzv_id="$rdzv_id" \
        --max_restarts=0 \
        -m "distmnist.$strategy" "$@"
) &
agent=$!
[ "$pending" = 0 ] || kill -TERM "$agent" 2> /dev/null || true

set +e
while :; do
    wait "$agent"
    rc=$?
    kill -0 "$agent" 2> /dev/null || break # `wait` returns early when a trapped signal arrives
done
exit "$rc"
