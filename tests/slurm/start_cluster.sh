#!/usr/bin/env bash
# Start a real one-node SLURM cluster on localhost for the `slurm`-marked tests (idempotent).
#
#   eval "$(tests/slurm/start_cluster.sh | tail -n1)"     # sets SLURM_CONF for this shell
#   tests/slurm/stop_cluster.sh                           # stops it again
#
# State, spool, pid, log and config files live under $SLURM_TEST_DIR (default /tmp/distmnist-slurm; at
# most 70 characters). Every (re)start begins with an empty job state and fresh logs: job ids restart at 1.
# The node `localhost` declares CPUs=4 (more than the real cores, so two 2-task jobs run at once) and two
# fake GPUs (`--gpus=N` works and sets CUDA_VISIBLE_DEVICES; there is no real device behind them).
# Authentication is auth/none + cred/none by default: no munged to start, no /run/munge, no key, nothing
# outside the state folder; SLURM_TEST_AUTH=munge selects munge instead.
# Ports: SLURM_TEST_PORT (default 6817) for slurmctld, +1 for slurmd.
#
# Only the last line of stdout is meant for callers: `export SLURM_CONF=<path>`. Progress goes to stderr.
# Exit codes: 0 cluster up; 3 this machine cannot run it (not root, or SLURM missing and no apt-get):
# callers skip; 1 anything else (logs are printed).
set -euo pipefail

DIR="${SLURM_TEST_DIR:-/tmp/distmnist-slurm}"
AUTH="${SLURM_TEST_AUTH:-none}"
PORT="${SLURM_TEST_PORT:-6817}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "start_cluster: $*" >&2; }
unavailable() { echo "start_cluster: cannot run a SLURM cluster here: $*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || unavailable "must run as root (daemons run as SlurmUser=root)"
DIR="$(realpath -m "$DIR")"
case "$DIR" in /) say "SLURM_TEST_DIR must not be /"; exit 1 ;; esac
# slurmstepd puts unix sockets (<= 108 bytes) in $DIR/spool: keep the folder short (not a pytest tmp_path)
[ "${#DIR}" -le 70 ] || { say "SLURM_TEST_DIR is longer than 70 characters: $DIR"; exit 1; }
CONF="$DIR/slurm.conf"
case "$AUTH" in none | munge) ;; *) say "SLURM_TEST_AUTH must be none or munge, not '$AUTH'"; exit 1 ;; esac

# --- install -----------------------------------------------------------------------------------------
missing=0
for cmd in sbatch srun scontrol sinfo squeue scancel slurmctld slurmd; do
    command -v "$cmd" > /dev/null || missing=1
done
[ "$AUTH" = munge ] && { command -v munged > /dev/null || missing=1; }
if [ "$missing" = 1 ]; then
    command -v apt-get > /dev/null || unavailable "SLURM is not installed and apt-get is unavailable"
    pkgs=(slurmctld slurmd slurm-client munge)
    say "installing ${pkgs[*]}"
    install() { DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}" >&2; }
    if ! install; then
        say "install failed; running apt-get update and retrying"
        apt-get update >&2 || true
        install || { say "apt-get install ${pkgs[*]} failed"; exit 1; }
    fi
fi

# --- configuration -----------------------------------------------------------------------------------
if [ "$AUTH" = munge ]; then
    auth_lines="AuthType=auth/munge
CredType=cred/munge"
else
    auth_lines="AuthType=auth/none
CredType=cred/none"
fi
conf_text="# written by tests/slurm/start_cluster.sh; one node, for tests only
ClusterName=distmnist-test
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
$auth_lines
# credentials expire after 10 s: a requeued job is held ~cred_expire before it may start again
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
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
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
# \`sbatch --wait\` polls after 2, 8, 32, 32... s while its interval < MinJobAge/2 (default 300: up to
# +30 s per job); at 5 it polls every 2 s. Finished jobs leave \`scontrol show job\` seconds after the end.
MinJobAge=5
# a job whose BeginTime has passed (e.g. after a requeue) starts within ~1 s, not at the next 30 s pass
SchedulerParameters=bf_interval=1,sched_interval=2
MailProg=/bin/true
GresTypes=gpu
NodeName=localhost CPUs=4 RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
gres_text="# two fake GPUs (character devices 195:0 and 195:1, like /dev/nvidia0..1); AutoDetect off: no NVML
AutoDetect=off
Name=gpu File=$DIR/dev/nvidia[0-1]"

pid_alive() { # pidfile: its process exists and is not a zombie (PID 1 may not reap here)
    local pid stat
    pid="$(cat "$1" 2> /dev/null)" || return 1
    stat="$(cat "/proc/$pid/stat" 2> /dev/null)" || return 1
    stat="${stat##*) }"
    [ "${stat:0:1}" != Z ]
}

cluster_up() { # the running daemons use exactly this config and the node is usable
    [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$conf_text" ] || return 1
    [ -f "$DIR/gres.conf" ] && [ "$(cat "$DIR/gres.conf")" = "$gres_text" ] || return 1
    pid_alive "$DIR/run/slurmctld.pid" && pid_alive "$DIR/run/slurmd.pid" || return 1
    local state
    state="$(SLURM_CONF="$CONF" timeout 10 sinfo -h -n localhost -o %T 2> /dev/null)" || return 1
    case "$state" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

if cluster_up; then
    say "already up ($CONF)"
    echo "export SLURM_CONF=$CONF"
    exit 0
fi

# Anything half-started from an earlier run (same state folder) goes first.
SLURM_TEST_DIR="$DIR" bash "$HERE/stop_cluster.sh" >&2

t0=$(date +%s%3N)
rm -rf "${DIR:?}/state" "${DIR:?}/spool" "${DIR:?}/run" "${DIR:?}/log" "${DIR:?}/dev"
mkdir -p "$DIR/state" "$DIR/spool" "$DIR/run" "$DIR/log" "$DIR/dev"
for i in 0 1; do
    # slurmd wants character devices (else it logs "not a valid character or block device" and
    # --gpus jobs get an empty CUDA_VISIBLE_DEVICES); where mknod is not allowed, link to /dev/null
    mknod "$DIR/dev/nvidia$i" c 195 "$i" 2> /dev/null || ln -s /dev/null "$DIR/dev/nvidia$i"
done
printf '%s\n' "$conf_text" > "$CONF"
printf '%s\n' "$gres_text" > "$DIR/gres.conf"
export SLURM_CONF="$CONF"

print_logs() {
    for f in "$DIR"/log/*; do
        [ -f "$f" ] || continue
        echo "----- $f (last 60 lines)" >&2
        tail -n 60 "$f" >&2
    done
}
fail() { say "$*"; print_logs; exit 1; }

# Daemons get /dev/null and a log file as stdio: an inherited stdout would keep a caller's
# `start_cluster.sh | tail -n1` pipe open for as long as the cluster lives.
if [ "$AUTH" = munge ]; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    if ! munge -n 2> /dev/null | unmunge > /dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged < /dev/null >> "$DIR/log/munged.out" 2>&1 ||
            fail "munged did not start"
        # stop_cluster.sh stops the munged that this script started, and no other
        cp /run/munge/munged.pid "$DIR/run/munged.pid" 2> /dev/null || true
        for _ in $(seq 50); do munge -n 2> /dev/null | unmunge > /dev/null 2>&1 && break; sleep 0.1; done
        munge -n | unmunge > /dev/null 2>&1 || fail "munge -n | unmunge fails"
    fi
fi

# -c: start from an empty job state every time (no old jobs, job ids from 1)
slurmctld -c < /dev/null >> "$DIR/log/slurmctld.out" 2>&1 || fail "slurmctld failed to start"
# the machine's hostname is not `localhost`: name the node explicitly
slurmd -N localhost < /dev/null >> "$DIR/log/slurmd.out" 2>&1 || fail "slurmd failed to start"

state=""
deadline=$(($(date +%s) + 60))
while :; do
    state="$(timeout 5 sinfo -h -n localhost -o %T 2> /dev/null || true)"
    [ "$state" = idle ] && break
    [ "$(date +%s)" -ge "$deadline" ] && fail "node not idle after 60 s (state: '${state:-no answer}')"
    sleep 0.2
done
say "cluster up in $(($(date +%s%3N) - t0)) ms ($CONF)"
echo "export SLURM_CONF=$CONF"
