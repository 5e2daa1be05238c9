#!/usr/bin/env bash
# Tear down the two-node test cluster built by tests/cluster/start.sh (same CLUSTER_TEST_DIR, CLUSTER_NS):
# cancels its jobs, stops slurmctld and both slurmd, ends every process still running in the two network
# namespaces (SIGTERM, SIGKILL after 10 s), deletes the namespaces (the veth pair goes with them; the private
# /etc/hosts and node-local mounts lived only in those processes' mount namespaces). Exit 0 even if nothing ran.
set -u
DIR="$(realpath -m "${CLUSTER_TEST_DIR:-/tmp/dm2n}")"
NS="${CLUSTER_NS:-dm2n}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "cluster/stop: $*" >&2; }
alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2> /dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat:0:1}" != Z ]
}
have_ns() { [ -e "/run/netns/$NS-$1" ]; }

if have_ns node1 && [ -f "$CONF" ]; then
    jobs="$(timeout 10 "$HERE/on" node1 squeue -h -o %A 2> /dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 "$HERE/on" node1 scancel $jobs 2> /dev/null
        for _ in $(seq 50); do
            [ -z "$(timeout 5 "$HERE/on" node1 squeue -h -o %A 2> /dev/null)" ] && break
            sleep 0.2
        done
    fi
    timeout 10 "$HERE/on" node1 scontrol shutdown > /dev/null 2>&1 || true
fi

our_pids() { # every process in the two namespaces, and our daemons wherever they are
    local n p comm
    for n in node1 node2; do have_ns "$n" && ip netns pids "$NS-$n" 2> /dev/null; done
    for p in /proc/[0-9]*; do
        comm="$(cat "$p/comm" 2> /dev/null)" || continue
        case "$comm" in slurmctld | slurmd | slurmstepd) ;; *) continue ;; esac
        if { tr '\0' '\n' < "$p/environ"; } 2> /dev/null | grep -qxF "SLURM_CONF=$CONF"; then echo "${p#/proc/}"; fi
    done
}
for _ in $(seq 50); do # give `scontrol shutdown` up to 5 s
    [ -z "$(our_pids)" ] && break
    sleep 0.1
done
pids="$(our_pids | sort -u | tr '\n' ' ')"
if [ -n "${pids// /}" ]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2> /dev/null
    still=""
    for _ in $(seq 100); do
        still=""
        for pid in $pids; do alive "$pid" && still="$still $pid"; done
        [ -z "$still" ] && break
        sleep 0.1
    done
    if [ -n "$still" ]; then
        say "still running after 10 s, killing:$still"
        # shellcheck disable=SC2086
        kill -KILL $still 2> /dev/null
        sleep 0.2
    fi
fi
for n in node1 node2; do
    have_ns "$n" && { ip netns del "$NS-$n" || say "ip netns del $NS-$n failed"; }
done
rm -f "$DIR"/run/*.pid
exit 0
