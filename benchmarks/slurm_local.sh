#!/usr/bin/env bash
# A one-node Slurm on this machine, for the real-Slurm tests: `start DIR` writes DIR/slurm.conf (this host, all its
# cores, no cgroups), starts munged, slurmctld and slurmd with their state, logs and pid files in DIR, and waits until
# the node is idle; `stop DIR` stops them by pid. Needs root and Debian's slurm-wlm and munge. Clients find the
# cluster with `export SLURM_CONF=DIR/slurm.conf`.
set -euo pipefail
action=${1:?usage: slurm_local.sh start|stop DIR} dir=$(realpath -m "${2:?usage: slurm_local.sh start|stop DIR}")
case "$action" in
start)
    mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
    host=$(hostname -s)
    node=$(slurmd -C | head -n 1) # NodeName=... CPUs=... RealMemory=...: what slurmd sees here
    cat >"$dir/slurm.conf" <<EOF
ClusterName=qsmtest
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ReturnToService=2
JobRequeue=1
MinJobAge=600
# a requeued task starts again within seconds, not at the next 30- or 60-second pass
SchedulerParameters=bf_interval=5,sched_interval=5
$node State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null ||
        create-munge-key -f >/dev/null
    munged --force --socket "$dir/munge/munge.socket" --pid-file "$dir/munge/munged.pid" \
        --log-file "$dir/munge/munged.log" --seed-file "$dir/munge/munged.seed"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$SLURM_CONF"
    slurmd -f "$SLURM_CONF"
    for _ in $(seq 120); do # the node registers within seconds
        state=$(sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
        [ "$state" = idle ] && exit 0
        sleep 0.5
    done
    echo "error: the Slurm node did not become idle (state: ${state:-none}); see $dir/slurmctld.log" >&2
    exit 1
    ;;
stop)
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        [ -s "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    ;;
*) echo "usage: slurm_local.sh start|stop DIR" >&2 && exit 2 ;;
esac
