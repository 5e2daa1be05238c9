#!/usr/bin/env bash
# Train on several machines with torchrun: run this on every node with the same --nnodes and --endpoint.
#
#   launch/multi_node.sh --nnodes N --endpoint HOST:PORT [--strategy ddp|trainer|fabric] [--nproc P]
#                        [--run-id ID] [-- config args]
#
#   node1$ launch/multi_node.sh --nnodes 2 --endpoint node1:29400 --strategy fabric -- -c fashion run.dir=/shared/runs/f
#   node2$ launch/multi_node.sh --nnodes 2 --endpoint node1:29400 --strategy fabric -- -c fashion run.dir=/shared/runs/f
#
# --nnodes    the number of machines (each runs this script once)
# --endpoint  HOST:PORT of the c10d rendezvous: HOST is one of the nodes (its agent hosts the rendezvous store),
#             by a name or address every node resolves to that machine; PORT free there and reachable from all nodes
# --strategy  ddp (default), trainer or fabric
# --nproc     processes on this node; default: its GPUs, or 2 without GPUs (CPU, gloo)
# --run-id    the rendezvous id, the same on every node (default: distmnist); two jobs sharing an endpoint need two
# --          everything after it goes to distmnist unchanged: [-c CONFIG] [-q] [section.key=value ...]
#
# It is slurm/torchrun_node.sh (what slurm/train.sh runs on every node) with a default --nproc; the torchrun command
# it runs is, on every node:
#
#   torchrun --nnodes=N --nproc_per_node=P --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=ID \
#            --rdzv_conf=join_timeout=T --max_restarts=0 -m distmnist.<strategy> [config args]
#
# No --node-rank: the c10d rendezvous numbers the nodes (sorted by hostname), and ranks node_rank*P ..
# node_rank*P+P-1 run on each; which node has which ranks does not change the numbers (same data order, same sums).
# Start-up: each agent waits T s for all N nodes (DISTMNIST_STARTUP_TIMEOUT_S, else the config's
# dist.startup_timeout_s, else 600); a node that does not arrive makes the others stop with one line naming it
# (or the nodes it may be) and what to check, instead of a hang. Every worker prints its rank and hostname.
# run.dir: best on a shared file system. Rank 0 writes the checkpoints and model.pt; to resume, every rank loads
# the checkpoint rank 0 chose (from its own node's run.dir), so a node-local run.dir resumes only where every node
# holds that file. data.root may be node-local: each node prepares its own copy of the data set.
# Signals: SIGTERM, SIGUSR1 or Ctrl-C make every process checkpoint at the next agreed step and stop; run the same
# command on every node again to resume. Exit code: torchrun's (0 done, 1 a process failed), 2 bad arguments.
set -uo pipefail

prog="multi_node.sh"
usage() { sed -n '2,/^set -/{/^set -/!p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "$prog: error: $* (see $prog --help)" >&2; exit 2; }

strategy="ddp" nnodes="" endpoint="" nproc="" run_id="distmnist"
while [ $# -gt 0 ]; do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --strategy) [ $# -ge 2 ] || die "--strategy needs a value"; strategy="$2"; shift 2 ;;
        --strategy=*) strategy="${1#*=}"; shift ;;
        --nnodes) [ $# -ge 2 ] || die "--nnodes needs a value"; nnodes="$2"; shift 2 ;;
        --nnodes=*) nnodes="${1#*=}"; shift ;;
        --endpoint | --rdzv-endpoint) [ $# -ge 2 ] || die "$1 needs a value"; endpoint="$2"; shift 2 ;;
        --endpoint=* | --rdzv-endpoint=*) endpoint="${1#*=}"; shift ;;
        --nproc | --nproc-per-node) [ $# -ge 2 ] || die "$1 needs a value"; nproc="$2"; shift 2 ;;
        --nproc=* | --nproc-per-node=*) nproc="${1#*=}"; shift ;;
        --run-id | --rdzv-id) [ $# -ge 2 ] || die "$1 needs a value"; run_id="$2"; shift 2 ;;
        --run-id=* | --rdzv-id=*) run_id="${1#*=}"; shift ;;
        --) shift; break ;;
        *) die "unknown option '$1' (config args go after --)" ;;
    esac
done
[ -n "$nnodes" ] || die "--nnodes is required: the number of machines"
[ -n "$endpoint" ] || die "--endpoint HOST:PORT is required: one node's name and a free port, the same on every node"
if [ -z "$nproc" ]; then
    nproc="$("${PYTHON:-python}" -c 'import torch; print(torch.cuda.device_count() or 2)' 2> /dev/null)" ||
        die "cannot import torch with ${PYTHON:-python}: activate the environment that has distmnist"
fi
exec bash "$(dirname "${BASH_SOURCE[0]}")/../slurm/torchrun_node.sh" --strategy "$strategy" --nnodes "$nnodes" \
    --nproc-per-node "$nproc" --rdzv-endpoint "$endpoint" --rdzv-id "$run_id" -- "$@"
