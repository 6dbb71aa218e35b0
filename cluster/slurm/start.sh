#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (for CI and for trying `autocnnp submit`).
#
# Installs Debian's slurmctld, slurmd, slurm-client and munge when missing, writes a slurm.conf
# for one node named after `hostname -s` (CPUs = nproc) in partition `debug`, starts munged,
# slurmctld and slurmd as root and waits until `sinfo` shows the node idle. Idempotent: a cluster
# this script started and that still answers is left as it is. Stop it with cluster/slurm/stop.sh.
#
# An existing /etc/slurm/slurm.conf that this script did not write is never touched (set
# AUTOCNNP_SLURM_FORCE=1 to replace it). Needs root (or sudo) to install and start the daemons.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=${AUTOCNNP_SLURM_STATE:-/var/lib/autocnnp-slurm}
MARK="# written by autocnnp cluster/slurm/start.sh"
HOST=$(hostname -s)
CPUS=${AUTOCNNP_SLURM_CPUS:-$(nproc)}
WAIT_S=${AUTOCNNP_SLURM_WAIT_S:-60}

say() { echo "slurm/start.sh: $*" >&2; }
die() { say "$*"; exit 1; }

sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || die "needs root (or sudo) to start slurmctld, slurmd and munged"
  sudo="sudo"
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
   || ! command -v munged >/dev/null; then
  say "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

if sinfo -h -o '%T' -n "$HOST" 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
  say "already running ($(sinfo -h -o '%P %D %T' | head -1))"
  exit 0
fi

if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF" && [ "${AUTOCNNP_SLURM_FORCE:-0}" != 1 ]; then
  die "$CONF exists and was not written by this script; refusing to replace it (AUTOCNNP_SLURM_FORCE=1 overrides)"
fi

$sudo mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log" /run/munge /var/log/munge /var/lib/munge
$sudo tee "$CONF" >/dev/null <<EOF
$MARK
ClusterName=autocnnp
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
# task/none and proctrack/linuxproc need no cgroups; an empty cgroup.conf keeps slurmd from probing
[ -f "$CONF_DIR/cgroup.conf" ] || echo "CgroupPlugin=autodetect" | $sudo tee "$CONF_DIR/cgroup.conf" >/dev/null

# munge: one key, daemon as root (--force: tolerate the permissive paths of containers)
[ -s /etc/munge/munge.key ] || $sudo mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
  || $sudo dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
$sudo chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
$sudo chmod 0700 /etc/munge && $sudo chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  if [ -z "$sudo" ] && command -v runuser >/dev/null; then
    runuser -u munge -- munged --force || munged --force
  else
    $sudo -u munge munged --force || $sudo munged --force
  fi
  $sudo touch "$STATE/munged.started"   # stop.sh stops only a munged started here
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munged does not answer"

stop_pid() { [ -s "$1" ] && $sudo kill "$(cat "$1")" 2>/dev/null || true; }
stop_pid "$STATE/slurmd.pid"; stop_pid "$STATE/slurmctld.pid"; sleep 0.5
$sudo slurmctld -c -i   # -c: clean start (no old jobs), -i: ignore unreadable state
$sudo slurmd

deadline=$(( $(date +%s) + WAIT_S ))
until sinfo -h -o '%T' -n "$HOST" 2>/dev/null | grep -qE '^(idle|mixed|allocated)$'; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sinfo -N -l >&2 || true
    tail -n 20 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 || true
    die "node $HOST not idle after ${WAIT_S}s (logs above; full ones in $STATE/log)"
  fi
  # a node that came back after a restart may stay DOWN until told otherwise
  sinfo -h -o '%T' -n "$HOST" 2>/dev/null | grep -qE '^(down|drain)' \
    && $sudo scontrol update nodename="$HOST" state=resume 2>/dev/null || true
  sleep 0.5
done
say "up: $(sinfo -h -o 'partition %P, %D node(s) %N, %c CPUs, %T')"
