#!/usr/bin/env bash
# Stop the Docker engine that cluster/docker/start.sh started: leave the swarm it joined since (should
# a test run have died before leaving it; the next run would take it for one of its own), stop dockerd (TERM: it stops its containers and its
# containerd; after 60 s KILL) and then whatever it started that is still there: the processes of
# its session and of its containerd's (the shims), with their containers. Does nothing to an engine
# start.sh did not start.
set -uo pipefail

STATE=${AUTOCNNP_DOCKER_STATE:-/var/lib/autocnnp-docker}
say() { echo "docker/stop.sh: $*" >&2; }

pid=$(cat "$STATE/dockerd.pid" 2>/dev/null)
if [ -z "$pid" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != dockerd ]; then
  rm -f "$STATE/dockerd.pid"
  say "no engine started by start.sh runs here; nothing to stop"
  exit 0
fi
if [ "$(cat "$STATE/swarm-at-start" 2>/dev/null)" = inactive ] \
   && [ "$(timeout 20 docker info -f '{{.Swarm.LocalNodeState}}' 2>/dev/null)" = active ]; then
  say "leaving the swarm this engine joined after start.sh, removing its gateway bridge"
  timeout 60 docker swarm leave --force >/dev/null && timeout 60 docker network rm docker_gwbridge >/dev/null
fi

alive() { ps -o stat= -p "$1" | grep -qv '^Z'; }   # a zombie is gone, its parent just did not reap it yet
sessions=$pid   # dockerd's session, and its containerd's (which holds the shims)
for child in $(pgrep -P "$pid" -x containerd); do sessions=$sessions,$child; done
running() { ps -o pid=,stat= -s "$sessions" | awk '$2 !~ /^Z/ {print $1}'; }
kill "$pid"
for _ in $(seq 600); do alive "$pid" || break; sleep 0.1; done
if alive "$pid"; then
  say "dockerd (pid $pid) ignored TERM for 60 s; killing it"
fi
for left in $(running); do   # all of it after a KILL; a shim's child is the first process of its container
  say "killing $(ps -o comm= -p "$left") (pid $left), left by dockerd"
  pkill -9 -P "$left"
  kill -9 "$left"
done
for _ in $(seq 50); do [ -z "$(running)" ] && break; sleep 0.1; done
if [ -n "$(running)" ]; then
  say "still running after KILL: $(running | paste -sd' ')"
  exit 1
fi
rm -f "$STATE/dockerd.pid" "$STATE/swarm-at-start"
say "stopped"
