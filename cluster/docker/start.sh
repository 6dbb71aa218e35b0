#!/usr/bin/env bash
# Start a Docker engine on this machine (for CI and for trying `autocnnp deploy --swarm`) with the
# base image of cluster/docker/Dockerfile on it.
#
# Installs Debian's docker.io when dockerd is missing, starts dockerd in a session of its own when
# no engine answers (pid file and log in $AUTOCNNP_DOCKER_STATE, default /var/lib/autocnnp-docker),
# waits until `docker info` answers, and builds the base image ($AUTOCNNP_DOCKER_BASE, default
# autocnnp-base:local) with cluster/docker/base-from-host.sh when the engine lacks it (that needs
# `make venv` first). Idempotent: an engine that answers is used as it is, and one this script did
# not start is never stopped by cluster/docker/stop.sh. Needs root.
set -euo pipefail
cd "$(dirname "$0")/../.."

STATE=${AUTOCNNP_DOCKER_STATE:-/var/lib/autocnnp-docker}
BASE=${AUTOCNNP_DOCKER_BASE:-autocnnp-base:local}
WAIT_S=${AUTOCNNP_DOCKER_WAIT_S:-60}
LOG=$STATE/dockerd.log

say() { echo "docker/start.sh: $*" >&2; }
die() { say "$*"; exit 1; }
answers() { timeout 20 docker info >/dev/null 2>&1; }

[ "$(id -u)" = 0 ] || die "needs root to start dockerd: run it as \`sudo bash $0\`"

if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
  say "installing docker.io"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends docker.io cgroupfs-mount >/dev/null
fi

if answers; then
  say "an engine answers already (Docker $(docker version -f '{{.Server.Version}}')); using it"
else
  mkdir -p "$STATE"
  mountpoint -q /sys/fs/cgroup || cgroupfs-mount   # machines booted without an init that mounts them
  setsid dockerd </dev/null >"$LOG" 2>&1 &
  pid=$!
  echo "$pid" >"$STATE/dockerd.pid"   # stop.sh stops only this dockerd, and what it started
  deadline=$(( $(date +%s) + WAIT_S ))
  until answers; do
    why=""
    kill -0 "$pid" 2>/dev/null || why="dockerd (pid $pid) exited while starting"
    [ "$(date +%s)" -lt "$deadline" ] || why="dockerd (pid $pid) does not answer after ${WAIT_S}s"
    if [ -n "$why" ]; then
      tail -n 20 "$LOG" >&2 || true
      die "$why (log above; full one in $LOG; cluster/docker/stop.sh stops it)"
    fi
    sleep 0.5
  done
  docker info -f '{{.Swarm.LocalNodeState}}' >"$STATE/swarm-at-start"   # stop.sh leaves a swarm joined later
  say "started dockerd (pid $pid, Docker $(docker version -f '{{.Server.Version}}'), log $LOG)"
fi

if docker image inspect "$BASE" >/dev/null 2>&1; then
  say "base image $BASE is there"
else
  say "building base image $BASE (cluster/docker/base-from-host.sh)"
  bash cluster/docker/base-from-host.sh "$BASE"
fi
