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
# Start-up: the agent waits at most the start-up timeout for all N nodes to join the rendezvous (torchrun's
# join_timeout): DISTMNIST_STARTUP_TIMEOUT_S if set, else the config's dist.startup_timeout_s (where the config
# has that key), else 600 s. When not every node arrives in time, each agent that did arrive stops with one line
# naming the endpoint, this node, the nodes that may be missing (the job's node list under SLURM) and what to
# check -- instead of torchrun's traceback. Every worker prints one line with its rank and hostname at start.
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

PYTHON="${PYTHON:-python}"
# The config args, read as `python -m distmnist.<strategy>` will (one line and exit 2 on a mistake), before any
# process starts; prints dist.startup_timeout_s where the config has that key.
startup="$("$PYTHON" - "$strategy" "$@" << 'PY'
import math
import sys

from distmnist.core.args import parse_strategy_args
from distmnist.core.errors import report_errors


@report_errors
def startup_timeout() -> int:
    cfg = parse_strategy_args(sys.argv[1], sys.argv[2:])
    value = getattr(cfg.dist, "startup_timeout_s", None)
    print("" if value is None else math.ceil(value))
    return 0


sys.exit(startup_timeout())
PY
)" || exit $?
join_timeout="${DISTMNIST_STARTUP_TIMEOUT_S:-${startup:-600}}"
[[ "$join_timeout" =~ ^[0-9]+$ ]] && [ "$join_timeout" -gt 0 ] ||
    die "DISTMNIST_STARTUP_TIMEOUT_S must be a whole number of seconds > 0, got '$join_timeout'"
this_node="$(hostname)"
expected=""
if [ -n "${SLURM_JOB_NODELIST:-}" ] && command -v scontrol > /dev/null; then
    # (grep finds no other node in a one-node job: not a failure under pipefail)
    expected="$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2> /dev/null | { grep -vxF "$this_node" || true; } | tr '\n' ' ')"
fi
expected="${expected% }"
# who joined, only the rendezvous knows: with two nodes the missing one is the other, with more some of the others
if [ -z "$expected" ]; then expected="the other $((nnodes - 1)) node(s)"; [ "$nnodes" -le 2 ] || expected="some of $expected"
elif [ "$nnodes" -gt 2 ]; then expected="some of $expected"; fi
echo "$prog: $this_node: torchrun agent for $nproc process(es), joining the rendezvous $endpoint of $nnodes node(s) (start-up timeout ${join_timeout} s)" >&2
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

# torchrun's stderr passes through this filter (line by line, unbuffered): a traceback that ends in
# RendezvousTimeoutError (not every node joined within join_timeout) becomes one line; all else passes unchanged.
# The filter ignores the signals the job's processes get, so it drains the agent's output to the end.
rdzv_filter() {
    trap '' USR1 TERM INT
    exec awk -v prog="$prog" -v node="$this_node" -v nnodes="$nnodes" -v endpoint="$endpoint" \
        -v timeout="$join_timeout" -v missing="$expected" '
        function flush(   i) { for (i = 1; i <= n; i++) print buf[i]; n = 0; fflush() }
        /^Traceback \(most recent call last\):/ { flush(); intb = 1; buf[++n] = $0; next }
        intb && /^[ \t]/ { buf[++n] = $0; next }
        intb && /RendezvousTimeoutError/ {
            intb = 0; n = 0
            printf "%s: error: not all %s nodes joined the rendezvous at %s within %s s: this node (%s) did; missing: %s. Check that every node runs the job with --nnodes=%s and the same --rdzv-id, that %s is reachable from every node (name resolution, firewall), or raise DISTMNIST_STARTUP_TIMEOUT_S\n", prog, nnodes, endpoint, timeout, node, missing, nnodes, endpoint
            fflush(); next
        }
        intb { intb = 0; buf[++n] = $0; flush(); next }
        { print; fflush() }
        END { flush() }'
}

# `python -m torch.distributed.run` is torchrun from the same environment as distmnist. It starts with SIGUSR1
# ignored (an ignored signal stays ignored across exec; the workers install their own handler for it). Each
# worker is `bash -c` that prints its rank and hostname, then execs `python -m distmnist.<strategy>`.
export PYTHON
exec {to_filter}> >(rdzv_filter >&2)
filter=$!
(
    trap '' USR1
    exec "$PYTHON" -m torch.distributed.run \
        --nnodes="$nnodes" \
        --nproc_per_node="$nproc" \
        --rdzv_backend=c10d \
        --rdzv_endpoint="$endpoint" \
        --rdzv_id="$rdzv_id" \
        --rdzv_conf="join_timeout=$join_timeout" \
        --max_restarts=0 \
        --no-python bash -c 'echo "'"$prog"': rank $RANK of $WORLD_SIZE on $(hostname) (node rank $GROUP_RANK, local rank $LOCAL_RANK)" >&2; exec "$PYTHON" -m "$0" "$@"' \
        "distmnist.$strategy" "$@"
) 2>&"$to_filter" &
agent=$!
exec {to_filter}>&- # the agent (and its workers) hold the filter's only input now
[ "$pending" = 0 ] || kill -TERM "$agent" 2> /dev/null || true

set +e
while :; do
    wait "$agent"
    rc=$?
    kill -0 "$agent" 2> /dev/null || break # `wait` returns early when a trapped signal arrives
done
wait "$filter" 2> /dev/null # the filter has written its last line
exit "$rc"
