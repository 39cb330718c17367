#!/usr/bin/env bash
# Start a one-node SLURM on this host for tests/test_slurm.py: writes slurm.conf under $STATE,
# starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node idle.
# Needs root and Debian's `slurm-wlm` and `munge` (.ci/run installs them). Prints the line
# `SLURM_CONF=...` that clients (sbatch, squeue, dask-jobqueue) need; exits non-zero with the
# reason on stderr where SLURM cannot start. Stop it with tests/slurm/stop.sh.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
STATE=${QKATLAS_SLURM_STATE:-/tmp/qkatlas-slurm}
CONF=$STATE/slurm.conf
NODE=$(hostname -s)

fail() { echo "slurm: $*" >&2; exit 1; }
for tool in munged slurmctld slurmd sinfo sbatch; do
  command -v "$tool" >/dev/null || fail "$tool not found (apt-get install slurm-wlm munge)"
done
[ "$(id -u)" = 0 ] || fail "needs root (the daemons run as root here)"

"$(dirname "$0")/stop.sh" --daemons-only >/dev/null 2>&1 || true  # daemons of an earlier start
rm -rf "$STATE/ctld" "$STATE/spool"  # a fresh cluster: no jobs or node state from an earlier start
mkdir -p "$STATE"/{ctld,spool,log,munge} /run/munge
chown munge:munge /run/munge "$STATE/munge"
[ -s /etc/munge/munge.key ] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none;
                                 chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
# SLURM and jobs must not be killed for exceeding the node's memory: leave 10% and 512 MB free.
available_mb=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
memory_mb=$(( available_mb * 9 / 10 - 512 ))
[ "$memory_mb" -ge 2048 ] || fail "only ${available_mb} MB of memory available (the test's worker job asks for 2 GB)"

cat > "$CONF" <<CONF
ClusterName=qkatlas-test
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPort=${QKATLAS_SLURMCTLD_PORT:-6817}
SlurmdPort=${QKATLAS_SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$CONF

if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged --socket=/run/munge/munge.socket.2 --log-file="$STATE/munge/munged.log" \
    --pid-file="$STATE/munge/munged.pid" --seed-file="$STATE/munge/munged.seed" \
    || fail "munged did not start: $(tail -3 "$STATE/munge/munged.log" 2>/dev/null)"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
  munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munge credentials do not round-trip"
fi

slurmctld -f "$CONF" || fail "slurmctld did not start: $(tail -3 "$STATE/log/slurmctld.log" 2>/dev/null)"
slurmd -f "$CONF" || fail "slurmd did not start: $(tail -3 "$STATE/log/slurmd.log" 2>/dev/null)"

for _ in $(seq 60); do
  state=$(sinfo -h -N -n "$NODE" -o %t 2>/dev/null || true)
  [ "$state" = idle ] && { echo "SLURM_CONF=$CONF"; exit 0; }
  [ "$state" = down ] || [ "$state" = "down*" ] && scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
  sleep 0.5
done
fail "node $NODE is not idle after 30 s (sinfo: ${state:-no answer}); logs: $(tail -3 "$STATE/log/slurmd.log" 2>/dev/null)"
