#!/usr/bin/env bash
# Install the system packages autocnnp needs on a node: Open MPI (mpirun) and its headers for mpi4py.
# Idempotent: does nothing when mpirun and mpicc are already there.
set -euo pipefail
if command -v mpirun >/dev/null && command -v mpicc >/dev/null; then
  exit 0
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null || { echo "autocnnp: Open MPI is missing and this user cannot apt-get; ask an admin for: openmpi-bin libopenmpi-dev" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends openmpi-bin libopenmpi-dev >/dev/null
