#!/usr/bin/env bash
# Stop what tests/slurm/start.sh started: cancel every job, then slurmd, slurmctld and munged
# (each by the pid file it wrote). `--daemons-only` leaves munged running.
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
STATE=${QKATLAS_SLURM_STATE:-/tmp/qkatlas-slurm}
export SLURM_CONF=$STATE/slurm.conf

stop_pid_file() {
  local file=$1 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

if [ -s "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
  timeout 20 scancel --full --quiet --user="$(id -un)" 2>/dev/null
fi
stop_pid_file "$STATE/slurmd.pid"
stop_pid_file "$STATE/slurmctld.pid"
[ "${1:-}" = --daemons-only ] || stop_pid_file "$STATE/munge/munged.pid"
exit 0
