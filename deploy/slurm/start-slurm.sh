#!/usr/bin/env bash
# Start a real single-node SLURM cluster on this machine, as root, for Elodin's `slurm` tests
# and for trying `elodin fingerprint --scheduler slurm` locally.
#
#   sudo deploy/slurm/start-slurm.sh      # installs slurm-wlm + munge if missing, starts
#                                         # munged, slurmctld and slurmd, waits for `srun`
#   sudo deploy/slurm/stop-slurm.sh       # stops them again
#
# Debian/Ubuntu only (apt-get). No systemd is needed: the daemons are started directly, so it
# works in containers and CI runners. Running it again is safe: daemons that are up with the
# same configuration are left alone; a changed configuration restarts them.
#
# Environment (all optional):
#   SLURM_START_TIMEOUT   seconds to wait for the node to become usable (default 120)
#   SLURM_CLUSTER_NAME    ClusterName (default elodin)
#   SLURM_PARTITION       the default partition (default debug)
set -euo pipefail

TIMEOUT="${SLURM_START_TIMEOUT:-120}"
CLUSTER="${SLURM_CLUSTER_NAME:-elodin}"
PARTITION="${SLURM_PARTITION:-debug}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd

log() { echo "start-slurm: $*" >&2; }
die() {
  echo "start-slurm: ERROR: $*" >&2
  for f in "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" /var/log/munge/munged.log; do
    if [ -s "$f" ]; then
      echo "----- last lines of $f -----" >&2
      tail -n 25 "$f" >&2
    fi
  done
  exit 1
}

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts system daemons)"

# --- 1. packages -------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
  || ! command -v munged >/dev/null || ! command -v srun >/dev/null; then
  command -v apt-get >/dev/null || die "slurm-wlm/munge are missing and apt-get is not available"
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || die "apt-get install slurm-wlm munge failed"
fi

# --- 2. munge ----------------------------------------------------------------------------
pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating /etc/munge/munge.key"
  if command -v mungekey >/dev/null; then
    runuser -u munge -- mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
if ! pid_alive /run/munge/munged.pid; then
  log "starting munged"
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2*
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
fi
for _ in $(seq 1 20); do
  munge -n </dev/null | unmunge >/dev/null 2>&1 && break
  sleep 0.5
done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge credentials do not round-trip (munge -n | unmunge)"

# --- 3. configuration --------------------------------------------------------------------
NODE="$(hostname -s)"
# slurmd -C prints this machine's real layout; the node line must not promise more than that,
# or slurmctld marks the node INVALID.
read -r CPUS MEM < <(slurmd -C | awk '
  /^NodeName=/ { for (i = 1; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
                 print v["CPUs"], v["RealMemory"] }')
[ -n "${CPUS:-}" ] && [ -n "${MEM:-}" ] || die "could not read CPUs/RealMemory from 'slurmd -C'"
# Leave a little memory to the OS and the daemons so jobs cannot starve them.
MEM=$((MEM * 95 / 100))
DEF_MEM_PER_CPU=$((MEM / CPUS))

install -d -m 0755 "$CONF_DIR" "$LOG_DIR"
install -d -m 0755 "$CTLD_STATE" "$SLURMD_SPOOL"

NEW_CONF="$(mktemp)"
trap 'rm -f "$NEW_CONF"' EXIT
cat >"$NEW_CONF" <<EOF
# Written by Elodin's deploy/slurm/start-slurm.sh: a single-node cluster on localhost.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$CTLD_STATE
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups needed: containers and CI runners rarely delegate them.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Jobs without --mem get a per-CPU share instead of the whole node.
DefMemPerCPU=$DEF_MEM_PER_CPU
ReturnToService=2
# Cancelled jobs (Dask workers at shutdown) are SIGKILLed after 5 s, not the default 30.
KillWait=5
MinJobAge=60
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

# slurmd reads cgroup.conf at start even with proctrack/linuxproc; a minimal one keeps it from
# probing cgroup mounts that containers do not have.
NEW_CGROUP="CgroupPlugin=autodetect
IgnoreSystemd=yes
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no"

CHANGED=0
if [ ! -f "$CONF" ] || ! cmp -s "$NEW_CONF" "$CONF"; then
  install -m 0644 "$NEW_CONF" "$CONF"
  CHANGED=1
  log "wrote $CONF (node $NODE: $CPUS CPUs, ${MEM} MB)"
fi
if [ ! -f "$CONF_DIR/cgroup.conf" ]; then
  printf '%s\n' "$NEW_CGROUP" >"$CONF_DIR/cgroup.conf"
  chmod 0644 "$CONF_DIR/cgroup.conf"
fi

# --- 4. daemons --------------------------------------------------------------------------
stop_daemon() { # name pidfile
  if pid_alive "$2"; then
    local pid
    pid="$(cat "$2")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$2"
}
if [ "$CHANGED" -eq 1 ]; then
  stop_daemon slurmd /run/slurmd.pid
  stop_daemon slurmctld /run/slurmctld.pid
fi
if ! pid_alive /run/slurmctld.pid; then
  log "starting slurmctld"
  /usr/sbin/slurmctld || die "slurmctld did not start"
fi
if ! pid_alive /run/slurmd.pid; then
  log "starting slurmd"
  /usr/sbin/slurmd || die "slurmd did not start"
fi

# --- 5. wait until the node is usable ----------------------------------------------------
deadline=$((SECONDS + TIMEOUT))
state=""
while :; do
  state="$(sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1 || true)"
  case "$state" in
    idle | mixed | allocated | completing) break ;;
    down* | drain* | fail*)
      # Left over from an earlier run (e.g. the node was killed): put it back in service.
      scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  [ "$SECONDS" -lt "$deadline" ] || die "node $NODE not usable after ${TIMEOUT}s (sinfo state: '${state:-no answer}')"
  sleep 1
done
out="$(timeout 60 srun -N1 -p "$PARTITION" -t 1 hostname 2>&1)" \
  || die "srun -N1 hostname failed: $out"
log "SLURM is up: partition $PARTITION, node $NODE ($state), srun ran on $out"
