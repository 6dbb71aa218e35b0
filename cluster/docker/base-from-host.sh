#!/usr/bin/env bash
# Build a local base image for cluster/docker/Dockerfile from this machine's own files, for
# machines where no base image can be pulled (no registry access): this machine's Python, the
# packages of the project's virtualenv (torch, mpi4py, ...), the system libraries (Open MPI
# included) and a few shell tools go into a root filesystem that `docker import` turns into an
# image. Usage:
#   cluster/docker/base-from-host.sh [IMAGE]     (default autocnnp-base:local; needs `make venv` first)
# Then: docker build -f cluster/docker/Dockerfile --build-arg BASE=autocnnp-base:local -t autocnnp:local .
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${1:-autocnnp-base:local}
VENV=${VENV:-.venv}
PY=$(readlink -f "$VENV/bin/python")                      # the interpreter the venv was made from
PREFIX=$(cd "$(dirname "$PY")/.." && pwd)                  # its installation prefix
VER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
command -v docker >/dev/null || { echo "base-from-host.sh: docker is not installed" >&2; exit 1; }
[ -x "$PY" ] || { echo "base-from-host.sh: no virtualenv at $VENV (run make venv)" >&2; exit 1; }

ROOT=$(mktemp -d /var/tmp/autocnnp-base.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT
copy() {  # copy() PATH...: into $ROOT at the same (parent-resolved) paths, links kept as links
  local p rel=()
  for p in "$@"; do
    [ -e "$p" ] || continue
    p="$(readlink -f "$(dirname "$p")")/$(basename "$p")"
    rel+=("${p#/}")
  done
  [ ${#rel[@]} -eq 0 ] || tar -C / -cf - "${rel[@]}" | tar -C "$ROOT" --keep-directory-symlink -xpf -
}

# system: loader, libraries (Open MPI and its plug-ins included), shells and the tools scripts use
mkdir -p "$ROOT/usr/bin" "$ROOT/usr/sbin" "$ROOT/usr/lib" "$ROOT/usr/lib64"
for d in bin sbin lib lib64; do  # merged /usr: the top-level folders are links
  if [ -L "/$d" ]; then ln -s "$(readlink "/$d")" "$ROOT/$d"; else copy "/$d"; fi
done
copy /usr/lib64 /usr/lib/x86_64-linux-gnu /usr/lib/openmpi /usr/share/openmpi /etc/openmpi \
     /etc/ld.so.conf /etc/ld.so.conf.d /etc/ld.so.cache /etc/passwd /etc/group /etc/nsswitch.conf
for tool in sh dash bash env cat tee hostname sleep ls mkdir rm cp mv id uname true false head tail grep sed \
            ps kill date mpirun mpiexec orterun orted ompi_info; do
  p=$(command -v "$tool" || true)
  [ -n "$p" ] || continue
  copy "$(readlink -f "$p")"
  [ -e "$ROOT/usr/bin/$tool" ] || ln -s "$(readlink -f "$p")" "$ROOT/usr/bin/$tool"  # no alternatives links
done
# Python: the interpreter and its standard library at their own paths (the prefix is compiled in),
# with the virtualenv's packages as its site-packages (autocnnp itself comes from the Dockerfile)
copy "$PY" "$PREFIX/lib/libpython$VER.so.1.0" "$PREFIX/lib/libpython$VER.so" "$PREFIX/lib/libpython3.so"
mkdir -p "$ROOT$PREFIX/lib/python$VER"
tar -C "$PREFIX/lib/python$VER" --exclude=./site-packages --exclude=./test --exclude='__pycache__' -cf - . \
  | tar -C "$ROOT$PREFIX/lib/python$VER" -xf -
mkdir -p "$ROOT$PREFIX/lib/python$VER/site-packages"
tar -C "$SITE" --exclude='__editable__*' --exclude='autocnnp*' --exclude='__pycache__' -cf - . \
  | tar -C "$ROOT$PREFIX/lib/python$VER/site-packages" -xf -
mkdir -p "$ROOT/usr/local/bin" "$ROOT/tmp" "$ROOT/root" "$ROOT/var/tmp"
chmod 1777 "$ROOT/tmp" "$ROOT/var/tmp"
for name in python python3 "python$VER"; do ln -sf "$PY" "$ROOT/usr/local/bin/$name"; done

echo "base-from-host.sh: importing $(du -sh "$ROOT" | cut -f1) as $IMAGE" >&2
tar -C "$ROOT" -cf - . | docker import \
  -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin' -c 'ENV LANG=C.UTF-8' - "$IMAGE" >/dev/null
docker run --rm "$IMAGE" python3 -c "import torch, mpi4py, lxml, numpy; print('base image ok: torch', torch.__version__)"
