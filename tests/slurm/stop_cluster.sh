#!/usr/bin/env bash
# Stop the test cluster started by tests/slurm/start_cluster.sh (same SLURM_TEST_DIR).
# Cancels its jobs, runs `scontrol shutdown`, waits for slurmctld, slurmd and their slurmstepd to exit
# (SIGKILL after 15 s), and stops munged if start_cluster.sh started it. Exit 0 even if nothing ran.
# It only ever talks to $SLURM_TEST_DIR/slurm.conf, never to a SLURM_CONF found in the environment.
set -u

DIR="$(realpath -m "${SLURM_TEST_DIR:-/tmp/distmnist-slurm}")"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "stop_cluster: $*" >&2; }

# Alive and not a zombie: where PID 1 does not reap (as in some CI VMs), an exited daemon stays a
# zombie that `kill -0` still reports as running.
alive() {
    local stat
    stat="$(cat "/proc/$1/stat" 2> /dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat:0:1}" != Z ]
}

pidfile_pid() { # pidfile -> pid if that process is alive
    local pid
    pid="$(cat "$1" 2> /dev/null)" || return 0
    [ -n "$pid" ] && alive "$pid" && echo "$pid"
    return 0
}

# Our daemons (and the slurmstepd they fork) carry SLURM_CONF=$CONF in their environment: this finds
# them even when a pid file is gone, and never touches another cluster's daemons.
our_pids() {
    pidfile_pid "$DIR/run/slurmctld.pid"
    pidfile_pid "$DIR/run/slurmd.pid"
    local p comm
    for p in /proc/[0-9]*; do
        comm="$(cat "$p/comm" 2> /dev/null)" || continue
        case "$comm" in slurmctld | slurmd | slurmstepd) ;; *) continue ;; esac
        if { tr '\0' '\n' < "$p/environ"; } 2> /dev/null | grep -qxF "SLURM_CONF=$CONF"; then
            echo "${p#/proc/}"
        fi
    done
}

shutdown_sent=0
if [ -f "$CONF" ] && command -v scontrol > /dev/null && [ -n "$(pidfile_pid "$DIR/run/slurmctld.pid")" ]; then
    # Jobs first: with proctrack/linuxproc a job's processes outlive a shut-down slurmd.
    jobs="$(timeout 10 squeue -h -o %A 2> /dev/null | tr '\n' ' ')"
    if [ -n "${jobs// /}" ]; then
        say "cancelling jobs: $jobs"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2> /dev/null
        for _ in $(seq 100); do # KillWait=5: a SIGTERM-ignoring job is killed after 5 s
            [ -z "$(timeout 5 squeue -h -o %A 2> /dev/null)" ] && break
            sleep 0.2
        done
    fi
    if timeout 10 scontrol shutdown > /dev/null 2>&1; then
        shutdown_sent=1
    else
        say "scontrol shutdown failed; terminating the daemons"
    fi
fi

pids="$(our_pids | sort -u | tr '\n' ' ')"
if [ -n "${pids// /}" ]; then
    # shellcheck disable=SC2086
    [ "$shutdown_sent" = 1 ] || kill -TERM $pids 2> /dev/null
    still=""
    for _ in $(seq 150); do
        still=""
        for pid in $pids; do alive "$pid" && still="$still $pid"; done
        [ -z "$still" ] && break
        sleep 0.1
    done
    if [ -n "$still" ]; then
        say "still running after 15 s, killing:$still"
        # shellcheck disable=SC2086
        kill -KILL $still 2> /dev/null
        sleep 0.2
    fi
fi

munged_pid="$(pidfile_pid "$DIR/run/munged.pid")"
if [ -n "$munged_pid" ]; then
    kill "$munged_pid" 2> /dev/null
    for _ in $(seq 50); do alive "$munged_pid" || break; sleep 0.1; done
    kill -KILL "$munged_pid" 2> /dev/null
fi
rm -f "$DIR/run/slurmctld.pid" "$DIR/run/slurmd.pid" "$DIR/run/munged.pid"
exit 0
