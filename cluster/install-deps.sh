#!/usr/bin/env bash
# Install the system packages autocnnp needs on a node: Open MPI (mpirun) and its headers for mpi4py.
# `install-deps.sh test` also installs what the test suite needs beyond a node: Debian's Chromium and
# its driver, for the dashboard test in a real (headless) browser.
# Idempotent: installs nothing when the commands are there already.
set -euo pipefail
commands="mpirun mpicc" packages="openmpi-bin libopenmpi-dev"
if [ "${1:-}" = test ]; then
  commands="$commands chromium chromedriver" packages="$packages chromium chromium-driver"
fi
missing=0
for c in $commands; do command -v "$c" >/dev/null || missing=1; done
[ "$missing" = 0 ] && exit 0
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "autocnnp: missing system packages and this user cannot apt-get; ask an admin for: $packages" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $packages >/dev/null
