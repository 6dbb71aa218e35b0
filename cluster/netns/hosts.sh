#!/usr/bin/env bash
# Two "hosts" on one machine for trying (and testing) hostfile-based mpirun across hosts:
# network namespaces acp-h1 (10.77.0.1) and acp-h2 (10.77.0.2) joined by a veth pair, each with
# its own /etc/hosts (ip netns exec mounts /etc/netns/NAME/hosts over /etc/hosts, in a mount
# namespace of its own, at every exec), so the host names resolve to addresses that only exist in
# one namespace. As on stock Debian and Ubuntu nodes, each host's file also maps its own name to
# 127.0.1.1, ahead of its real address. The filesystem stays shared, as
# on a cluster with a shared filesystem. Start commands "on" a host with cluster/netns/on HOST CMD;
# mpirun reaches the other host through the launch agent cluster/netns/agent (in place of ssh).
#   hosts.sh up     create them (idempotent)      hosts.sh down   remove them
# Needs root and the ip tool (iproute2).
set -euo pipefail
H1=acp-h1 H2=acp-h2 NET=10.77.0
[ "$(id -u)" = 0 ] || { echo "netns/hosts.sh: needs root" >&2; exit 1; }
command -v ip >/dev/null || { echo "netns/hosts.sh: needs ip (apt-get install iproute2)" >&2; exit 1; }

down() {
  for h in $H1 $H2; do
    ip netns pids "$h" 2>/dev/null | xargs -r kill 2>/dev/null || true
    ip netns del "$h" 2>/dev/null || true
    rm -rf "/etc/netns/$h"
  done
}

hosts_files() {
  for h in $H1 $H2; do
    mkdir -p "/etc/netns/$h"
    printf '127.0.0.1 localhost\n127.0.1.1 %s\n%s.1 %s\n%s.2 %s\n' "$h" $NET $H1 $NET $H2 > "/etc/netns/$h/hosts"
  done
}

up() {
  if ! ip -n $H1 -br addr show acp-veth1 2>/dev/null | grep -q "$NET.1/" \
     || ! ip -n $H2 -br addr show acp-veth2 2>/dev/null | grep -q "$NET.2/"; then
    down
    for h in $H1 $H2; do ip netns add "$h"; done
    ip link add acp-veth1 netns $H1 type veth peer name acp-veth2 netns $H2
    ip -n $H1 addr add $NET.1/24 dev acp-veth1
    ip -n $H2 addr add $NET.2/24 dev acp-veth2
    for h in $H1 $H2; do
      ip -n "$h" link set lo up
      ip -n "$h" link set "acp-veth${h#acp-h}" up
    done
  fi
  hosts_files
}

case "${1:-}" in
  up) up; echo "netns/hosts.sh: hosts $H1 ($NET.1) and $H2 ($NET.2) are up" >&2 ;;
  down) down; echo "netns/hosts.sh: removed $H1 and $H2" >&2 ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
