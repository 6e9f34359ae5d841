#!/usr/bin/env bash
# A real single-node Slurm on localhost, for the cluster tests (docs/cluster.md).
#
#   .ci/slurm.sh start   install (apt-get) if missing, configure, start munged, slurmctld
#                        and slurmd, wait for the idle node; writes $SPOOL/env.sh
#                        (SLURM_CONF, PATH with the sacct stand-in, HESSBENCH_TEST_SLURM=1)
#   .ci/slurm.sh stop    stop the daemons this script started, by their PID files
#
# SPOOL is $HESSBENCH_SLURM_DIR (default /tmp/hessbench-slurm). Needs root (Debian/Ubuntu,
# no systemd needed). There is no accounting database: a small `sacct` stand-in, first
# on PATH, answers submitit's `sacct -o JobID,State,NodeList --parsable2 -j ID` from
# `squeue --states=all`, and MinJobAge keeps finished jobs visible to squeue for an hour.
set -euo pipefail

SPOOL=${HESSBENCH_SLURM_DIR:-/tmp/hessbench-slurm}
TIMEOUT_S=${HESSBENCH_SLURM_TIMEOUT_S:-60}

die() {
    echo "slurm.sh: $*" >&2
    exit 1
}

alive() { # alive PIDFILE: the process named in PIDFILE exists
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sinfo >/dev/null || missing+=(slurm-client)
    command -v munged >/dev/null || missing+=(munge)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" -eq 0 ] || die "needs root to install ${missing[*]}"
    echo "slurm.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

write_config() {
    local cpus mem
    cpus=$(nproc)
    mem=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$SPOOL/state" "$SPOOL/slurmd" "$SPOOL/log" "$SPOOL/bin"
    cat >"$SPOOL/slurm.conf" <<EOF
ClusterName=hessbench-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
EnforcePartLimits=ALL
ReturnToService=2
MinJobAge=3600
KillWait=5
SlurmdParameters=config_overrides
MailProg=/bin/true
StateSaveLocation=$SPOOL/state
SlurmdSpoolDir=$SPOOL/slurmd
SlurmctldPidFile=$SPOOL/slurmctld.pid
SlurmdPidFile=$SPOOL/slurmd.pid
SlurmctldLogFile=$SPOOL/log/slurmctld.log
SlurmdLogFile=$SPOOL/log/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    # submitit polls sacct; without accounting, answer from squeue instead.
    cat >"$SPOOL/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in (hessbench CI): `sacct -o JobID,State,NodeList --parsable2 -j ID ...`
ids=()
while [ $# -gt 0 ]; do
    case "$1" in
        -j | --jobs) ids+=("$2"); shift 2 ;;
        -j*) ids+=("${1#-j}"); shift ;;
        *) shift ;;
    esac
done
echo "JobID|State|NodeList"
for id in "${ids[@]}"; do
    squeue --states=all --array -h -o '%i|%T|%N' -j "$id" 2>/dev/null || true
done
EOF
    chmod +x "$SPOOL/bin/sacct"
    cat >"$SPOOL/env.sh" <<EOF
export SLURM_CONF=$SPOOL/slurm.conf
export PATH=$SPOOL/bin:\$PATH
export HESSBENCH_TEST_SLURM=1
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return # a munged is already running (not ours: we leave it alone)
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge
    chmod 0755 /run/munge
    [ -s /etc/munge/munge.key ] || die "/etc/munge/munge.key is missing (reinstall munge)"
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$SPOOL/munged.pid"
    local i
    for i in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    die "munged does not answer (munge -n | unmunge)"
}

start() {
    local t0=$SECONDS
    install_packages
    if alive "$SPOOL/slurmctld.pid" || alive "$SPOOL/slurmd.pid"; then
        die "already running (from $SPOOL); run '$0 stop' first"
    fi
    rm -rf "$SPOOL"
    write_config
    start_munge
    export SLURM_CONF=$SPOOL/slurm.conf
    slurmctld -i -f "$SLURM_CONF"
    slurmd -N localhost -f "$SLURM_CONF"
    local state=""
    while [ $((SECONDS - t0)) -lt "$TIMEOUT_S" ]; do
        state=$(sinfo -h -o %T 2>/dev/null || true)
        [ "$state" = idle ] && break
        sleep 0.5
    done
    if [ "$state" != idle ]; then
        echo "slurm.sh: node not idle after ${TIMEOUT_S}s (state: '${state:-none}'); logs:" >&2
        tail -n 20 "$SPOOL"/log/*.log >&2 || true
        stop
        exit 1
    fi
    echo "slurm.sh: Slurm $(sinfo -V | awk '{print $2}') up in $((SECONDS - t0)) s;" \
        "source $SPOOL/env.sh" >&2
}

stop_pid() { # stop_pid NAME PIDFILE: SIGTERM, wait up to 10 s, then SIGKILL
    local pid i
    [ -s "$2" ] || return 0
    pid=$(cat "$2")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "slurm.sh: $1 ($pid) ignored SIGTERM; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$2"
}

stop() {
    stop_pid slurmd "$SPOOL/slurmd.pid"
    stop_pid slurmctld "$SPOOL/slurmctld.pid"
    stop_pid munged "$SPOOL/munged.pid"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: $0 start|stop" ;;
esac
