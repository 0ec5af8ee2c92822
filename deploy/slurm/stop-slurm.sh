#!/usr/bin/env bash
# Stop the single-node SLURM cluster started by deploy/slurm/start-slurm.sh (as root).
# Jobs still queued or running are cancelled first. Safe to run when nothing is running.
# Configuration, state and logs are kept; pass --purge to remove the job state as well
# (/var/spool/slurmctld, /var/spool/slurmd), so the next start is a clean one.
set -euo pipefail

log() { echo "stop-slurm: $*" >&2; }
[ "$(id -u)" -eq 0 ] || { log "run as root"; exit 1; }

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() { # name pidfile
  if pid_alive "$2"; then
    local pid
    pid="$(cat "$2")"
    log "stopping $1 (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$2"
}

if pid_alive /run/slurmctld.pid && command -v scancel >/dev/null; then
  jobs="$(squeue -h -o '%i' 2>/dev/null || true)"
  if [ -n "$jobs" ]; then
    log "cancelling jobs: $(echo $jobs)"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    sleep 1
  fi
fi
stop_daemon slurmd /run/slurmd.pid
stop_daemon slurmctld /run/slurmctld.pid
stop_daemon munged /run/munge/munged.pid

if [ "${1:-}" = "--purge" ]; then
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
  log "purged job state"
fi
log "stopped"
