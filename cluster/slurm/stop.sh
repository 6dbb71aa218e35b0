#!/usr/bin/env bash
# Stop the single-node Slurm cluster that cluster/slurm/start.sh started: cancel its jobs, stop
# slurmd, slurmctld and the munged it started. Does nothing to a Slurm this script did not set up.
set -uo pipefail

STATE=${AUTOCNNP_SLURM_STATE:-/var/lib/autocnnp-slurm}
MARK="# written by autocnnp cluster/slurm/start.sh"
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"

if ! grep -qF "$MARK" /etc/slurm/slurm.conf 2>/dev/null; then
  echo "slurm/stop.sh: no cluster started by start.sh here; nothing to stop" >&2
  exit 0
fi
scancel --user="$(id -un)" 2>/dev/null || true

stop() {  # pid file, name: TERM, wait up to 10 s, then KILL
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 0
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  $sudo kill "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  echo "slurm/stop.sh: $2 (pid $pid) ignored TERM; killing it" >&2
  $sudo kill -9 "$pid" 2>/dev/null
}
stop "$STATE/slurmd.pid" slurmd
stop "$STATE/slurmctld.pid" slurmctld
if [ -f "$STATE/munged.started" ]; then
  stop /run/munge/munged.pid munged
  $sudo rm -f "$STATE/munged.started"
fi
echo "slurm/stop.sh: stopped" >&2
