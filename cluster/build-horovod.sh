#!/usr/bin/env bash
# Build and install Horovod 0.28.1 (PyTorch, and TensorFlow where it is installed; MPI and Gloo controllers;
# CPU) into a virtualenv.
#
#   bash cluster/build-horovod.sh [VENV]      (default .venv; `make horovod` runs this)
#
# 0.28.1 is Horovod's last release and ships no wheels; its sdist asks CMake for C++14, which
# torch 2.x headers reject. We download the sdist (pinned by hash), raise CMAKE_CXX_STANDARD to 17 in
# CMakeLists.txt and horovod/torch/CMakeLists.txt, and build it against the venv's torch without build
# isolation. Where TensorFlow is installed (`make tensorflow`, first), its extension is built too, without
# Horovod's XLA ops: xla_mpi_ops.cc includes TensorFlow's XLA headers, which include highwayhash headers
# that the TensorFlow 2.21 wheel does not ship. About 6 minutes on 2 cores (torch), about 15 with
# TensorFlow. Idempotent: does nothing when horovod.torch (and horovod.tensorflow) import.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv}"
PY="$VENV/bin/python"
VERSION=0.28.1
SHA256=92a43f5a94c43907a56805bad15f19700c62ffc83b7ca483f9e104e229f67ef0

die() { echo "build-horovod: $*" >&2; exit 1; }

[ -x "$PY" ] || die "no virtualenv at $VENV (run \`make venv\` first)"
WITH_TF=0
if "$PY" -c "import tensorflow" >/dev/null 2>&1; then WITH_TF=1; fi
WANTED="import horovod.torch"
[ "$WITH_TF" = 1 ] && WANTED="$WANTED, horovod.tensorflow"
if "$PY" -c "$WANTED" >/dev/null 2>&1; then
  echo "build-horovod: horovod $("$PY" -c 'import horovod; print(horovod.__version__)') already installed in $VENV"
  exit 0
fi
"$PY" -c "import torch" 2>/dev/null || die "torch is not installed in $VENV (run \`make venv\` first)"

# Build tools: Open MPI with its compiler wrappers (cluster/install-deps.sh), CMake >= 3.13 and a C++17 compiler.
bash cluster/install-deps.sh
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || die "cmake or g++ is missing and this user cannot apt-get; ask for: cmake g++"
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends cmake g++ make >/dev/null
fi

"$PY" -m pip install -q -r requirements/horovod.txt

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "horovod==$VERSION --hash=sha256:$SHA256" > "$tmp/req.txt"
"$PY" -m pip download -q --no-deps --no-binary :all: --no-build-isolation --require-hashes \
  -r "$tmp/req.txt" -d "$tmp"
tar -xzf "$tmp/horovod-$VERSION.tar.gz" -C "$tmp"
src="$tmp/horovod-$VERSION"

# C++14 -> C++17: torch 2.x headers need C++17. Fail loudly if the sdist is not the one we expect.
for f in CMakeLists.txt horovod/torch/CMakeLists.txt; do
  grep -q 'set(CMAKE_CXX_STANDARD 14)' "$src/$f" || die "no 'set(CMAKE_CXX_STANDARD 14)' in $f: update the patch"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$src/$f"
  grep -q 'set(CMAKE_CXX_STANDARD 17)' "$src/$f" || die "patching $f failed"
  ! grep -q 'set(CMAKE_CXX_STANDARD 14)' "$src/$f" || die "patching $f left a C++14 setting"
done
if [ "$WITH_TF" = 1 ]; then  # no XLA ops (see above): the TensorFlow extension without xla_mpi_ops.cc
  f=horovod/tensorflow/CMakeLists.txt
  grep -q 'xla_mpi_ops.cc' "$src/$f" || die "no xla_mpi_ops.cc in $f: update the patch"
  sed -i '/xla_mpi_ops.cc/d' "$src/$f"
  TF_FLAG=HOROVOD_WITH_TENSORFLOW=1
else
  TF_FLAG=HOROVOD_WITHOUT_TENSORFLOW=1
fi

echo "build-horovod: building horovod $VERSION in $src (several minutes)"
started=$SECONDS
env HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_MPI=1 HOROVOD_WITH_GLOO=1 "$TF_FLAG" \
HOROVOD_WITHOUT_MXNET=1 HOROVOD_CPU_OPERATIONS=MPI MAKEFLAGS="-j$(nproc)" \
  "$PY" -m pip install --no-deps --no-build-isolation --no-cache-dir --force-reinstall "$src" \
  > "$tmp/build.log" 2>&1 || { tail -n 80 "$tmp/build.log" >&2; die "build failed (log above)"; }

# Check: the torch extension loads and was built with the MPI and Gloo controllers.
"$PY" - "$WITH_TF" <<'PYEOF' || die "horovod installed but does not load; see the message above"
import importlib, sys
frameworks = ["torch"] + ["tensorflow"] * (sys.argv[1] == "1")
for framework in frameworks:
    hvd = importlib.import_module(f"horovod.{framework}")
    missing = [name for name, ok in (("mpi", hvd.mpi_built()), ("gloo", hvd.gloo_built())) if not ok]
    if missing:
        raise SystemExit(f"horovod.{framework} built without {', '.join(missing)}")
print(f"build-horovod: horovod {__import__('horovod').__version__} ({', '.join(frameworks)}; MPI + Gloo) installed")
PYEOF
echo "build-horovod: built in $((SECONDS - started)) s"
