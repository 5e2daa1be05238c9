#!/usr/bin/env bash
# Build a test cluster of two hosts on this machine (idempotent) for the `multinode`-marked tests:
#
#   eval "$(tests/cluster/start.sh | tail -n1)"          # sets SLURM_CONF for this shell
#   tests/cluster/on node1 sinfo                          # run a command on a node
#   tests/cluster/on node1 sbatch --wait --nodes=2 --wrap 'srun hostname'
#   tests/cluster/stop.sh                                 # tears it all down
#
# Two network namespaces, /run/netns/$CLUSTER_NS-node1 and -node2, linked only to each other by one veth pair
# (198.18.0.1 node1, 198.18.0.2 node2; CLUSTER_NET=a.b.c picks another /24). Nothing is bridged or routed into
# the machine's own namespace, and the script refuses a range the machine's routing table knows (exit 3).
# A process "on" a node (tests/cluster/on) runs in the node's network namespace, in a UTS namespace of its own
# whose hostname is the node's name, and in a private mount namespace where $DIR/hosts is bind-mounted on
# /etc/hosts (node1, node2 resolve; the machine's own /etc/hosts is never touched) and the node's own folder
# $DIR/nodes/NODE is bind-mounted on $DIR/local: a node-local disk, the same path on both nodes.
# SLURM: slurmctld and `slurmd -N node1` on node1, `slurmd -N node2` on node2, each with its own spool, pid and
# log files under $DIR; auth/none (no munged). The daemons listen inside the namespaces, so the machine's own
# one-node test cluster (tests/slurm/start_cluster.sh, 127.0.0.1) runs beside this one on the same ports.
# Every (re)start begins with an empty job state: job ids restart at 1.
#
# $DIR = $CLUSTER_TEST_DIR, default /tmp/dm2n (at most 40 characters: slurmstepd puts unix sockets under it).
# Only the last line of stdout is meant for callers: `export SLURM_CONF=<path>`. Progress goes to stderr.
# Exit codes: 0 cluster up; 3 this machine cannot run it (not root, no network namespaces, no SLURM and no
# apt-get, the address range in use): callers skip; 1 anything else (logs are printed).
set -euo pipefail

DIR="${CLUSTER_TEST_DIR:-/tmp/dm2n}"
NS="${CLUSTER_NS:-dm2n}"
NET="${CLUSTER_NET:-198.18.0}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "cluster/start: $*" >&2; }
unavailable() { echo "cluster/start: cannot build the two-node test cluster here: $*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || unavailable "must run as root (network namespaces, SlurmUser=root)"
DIR="$(realpath -m "$DIR")"
case "$DIR" in /) say "CLUSTER_TEST_DIR must not be /"; exit 1 ;; esac
[ "${#DIR}" -le 40 ] || { say "CLUSTER_TEST_DIR is longer than 40 characters: $DIR"; exit 1; }
[[ "$NET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || { say "CLUSTER_NET must be the first three numbers of a /24, got '$NET'"; exit 1; }
CONF="$DIR/slurm.conf"
for cmd in ip nsenter unshare mount hostname; do
    command -v "$cmd" > /dev/null || unavailable "'$cmd' is missing"
done

# --- the address range: never one this machine knows ---------------------------------------------------------
# Any route other than the default one that covers $NET.0/24 (or an address of ours in it) means the range is
# in use here: a test node's address could then be another machine's.
if ! ip netns list 2> /dev/null | grep -q "^$NS-node1\b"; then
    known="$({ ip -o route show to match "$NET.1" | grep -v '^default'; ip -o addr show | grep -F " $NET."; } 2> /dev/null |
        sed -n 1p | tr -s ' \\' ' ' || true)"
    [ -z "$known" ] || unavailable "$NET.0/24 is known to this machine's network (${known% }): set CLUSTER_NET to a range it does not route"
fi

# --- SLURM -----------------------------------------------------------------------------------------------------
missing=0
for cmd in sbatch srun scontrol sinfo squeue scancel slurmctld slurmd; do
    command -v "$cmd" > /dev/null || missing=1
done
if [ "$missing" = 1 ]; then
    command -v apt-get > /dev/null || unavailable "SLURM is not installed and apt-get is unavailable"
    pkgs=(slurmctld slurmd slurm-client)
    say "installing ${pkgs[*]}"
    install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; }
    if ! install; then
        apt-get update >&2 || true
        install || { say "apt-get install ${pkgs[*]} failed"; exit 1; }
    fi
fi

conf_text="# written by tests/cluster/start.sh; two nodes in network namespaces, for tests only
ClusterName=distmnist-2n
SlurmctldHost=node1($NET.1)
SlurmctldPort=6817
SlurmdPort=6818
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# CPUs=8 on each node (more than the machine has): several 2-process jobs run at once
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=5
SchedulerParameters=bf_interval=1,sched_interval=2
MailProg=/bin/true
NodeName=node1 NodeAddr=$NET.1 NodeHostname=node1 CPUs=8 RealMemory=1000 State=UNKNOWN
NodeName=node2 NodeAddr=$NET.2 NodeHostname=node2 CPUs=8 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
hosts_text="127.0.0.1 localhost
::1 localhost
$NET.1 node1
$NET.2 node2"

on() { "$HERE/on" "$@"; }
pid_alive() { # pidfile: its process exists and is not a zombie
    local pid stat
    pid="$(cat "$1" 2> /dev/null)" || return 1
    stat="$(cat "/proc/$pid/stat" 2> /dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat:0:1}" != Z ]
}
node_states() { SLURM_CONF="$CONF" timeout 10 "$HERE/on" node1 sinfo -h -N -o '%N %T' 2> /dev/null | sort | tr '\n' ' '; }
usable() { # "node1 idle node2 mixed " ...
    local s="$1" n
    for n in node1 node2; do
        [[ "$s" =~ $n\ (idle|mixed|allocated|completing)\  ]] || return 1
    done
}
cluster_up() {
    [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$conf_text" ] && [ -f "$DIR/hosts" ] && [ "$(cat "$DIR/hosts")" = "$hosts_text" ] || return 1
    [ -e "/run/netns/$NS-node1" ] && [ -e "/run/netns/$NS-node2" ] || return 1
    pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.node1.pid" && pid_alive "$DIR/run/slurmd.node2.pid" || return 1
    usable "$(node_states)"
}

if cluster_up; then
    say "already up ($CONF)"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# anything half-built by an earlier run goes first
CLUSTER_TEST_DIR="$DIR" CLUSTER_NS="$NS" bash "$HERE/stop.sh" >&2

t0=$(date +%s%3N)
# --- the two hosts ---------------------------------------------------------------------------------------------
ip netns add "$NS-node1" 2> /dev/null || unavailable "ip netns add failed (no network namespaces here?)"
ip netns add "$NS-node2" || { say "ip netns add $NS-node2 failed"; exit 1; }
# one veth pair, one end in each namespace: the only link node1 <-> node2
ip link add "${NS}a" netns "$NS-node1" type veth peer name "${NS}b" netns "$NS-node2" ||
    unavailable "cannot create a veth pair between the namespaces"
ip -n "$NS-node1" addr add "$NET.1/24" dev "${NS}a"
ip -n "$NS-node2" addr add "$NET.2/24" dev "${NS}b"
for i in 1 2; do
    ip -n "$NS-node$i" link set lo up
done
ip -n "$NS-node1" link set "${NS}a" up
ip -n "$NS-node2" link set "${NS}b" up

rm -rf "${DIR:?}/state" "${DIR:?}/spool" "${DIR:?}/run" "${DIR:?}/log" "${DIR:?}/nodes"
mkdir -p "$DIR/state" "$DIR/spool/node1" "$DIR/spool/node2" "$DIR/run" "$DIR/log" "$DIR/local" \
    "$DIR/nodes/node1" "$DIR/nodes/node2"
printf '%s\n' "$conf_text" > "$CONF"
printf '%s\n' "$hosts_text" > "$DIR/hosts"
export SLURM_CONF="$CONF"

print_logs() {
    for f in "$DIR"/log/*; do
        [ -f "$f" ] || continue
        echo "----- $f (last 40 lines)" >&2
        tail -n 40 "$f" >&2
    done
}
fail() { say "$*"; print_logs; exit 1; }

# daemons: stdio to log files (an inherited stdout would keep a caller's `| tail -n1` open)
on node1 slurmctld -c < /dev/null >> "$DIR/log/slurmctld.out" 2>&1 || fail "slurmctld failed to start"
on node1 slurmd -N node1 < /dev/null >> "$DIR/log/slurmd.node1.out" 2>&1 || fail "slurmd on node1 failed to start"
on node2 slurmd -N node2 < /dev/null >> "$DIR/log/slurmd.node2.out" 2>&1 || fail "slurmd on node2 failed to start"

deadline=$(($(date +%s) + 60))
while :; do
    states="$(node_states || true)"
    [[ "$states" =~ node1\ idle\ node2\ idle ]] && break
    [ "$(date +%s)" -ge "$deadline" ] && fail "nodes not idle after 60 s (sinfo: '${states:-no answer}')"
    sleep 0.2
done
say "cluster up in $(($(date +%s%3N) - t0)) ms: node1 $NET.1, node2 $NET.2 ($CONF)"
echo "export SLURM_CONF=$CONF"
