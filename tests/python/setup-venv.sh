#!/usr/bin/env bash
# Prepares the Python environment of the gRPC interop test (tests/tests/e2e/python_interop.rs)
# and of the agent API description's check (tests/tests/e2e/agent.rs):
# a venv with the exact packages of tests/python/requirements.txt, from PyPI, wheels only.
#
#   venv:   $FEDFLOW_PY_VENV, default ${XDG_CACHE_HOME:-$HOME/.cache}/fedflow/py-venv
#   python: $FEDFLOW_PYTHON, default python3 (3.9 or newer, with the venv module)
#
# Idempotent: when the venv was built from the same requirements (and the same Python) it
# does nothing and needs no network. Otherwise it rebuilds the venv from scratch. Concurrent
# runs wait for each other (flock). Prints the venv's python on stdout, all else on stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
req="$here/requirements.txt"
base_python="${FEDFLOW_PYTHON:-python3}"
venv="${FEDFLOW_PY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fedflow/py-venv}"

die() { echo "setup-venv.sh: $*" >&2; exit 1; }

command -v "$base_python" >/dev/null 2>&1 ||
  die "'$base_python' not found: the Python interop test needs Python 3.9+ with its venv module (Debian/Ubuntu: apt-get install python3 python3-venv), or set FEDFLOW_PYTHON to one"
"$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' ||
  die "$("$base_python" --version 2>&1) is too old: the Python interop test needs Python 3.9+"

# What the venv must have been built from: the requirements and the interpreter.
want="$("$base_python" -c 'import hashlib, sys
print(hashlib.sha256(open(sys.argv[1], "rb").read() + sys.version.encode()).hexdigest())' "$req")"
stamp="$venv/.fedflow-requirements.sha256"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  echo "$venv/bin/python"
  exit 0
fi

echo "setup-venv.sh: building $venv from $req" >&2
start=$SECONDS
rm -rf "$venv"
"$base_python" -m venv "$venv" >&2 ||
  die "'$base_python -m venv' failed: install the venv module (Debian/Ubuntu: apt-get install python3-venv)"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
  --only-binary=:all: --requirement "$req" >&2 ||
  die "pip could not install $req (it needs PyPI, or a mirror set with PIP_INDEX_URL)"
"$venv/bin/python" -c 'import grpc, grpc_tools.protoc, grpc_health.v1.health_pb2, openapi_spec_validator' >&2 ||
  die "the installed packages do not import"
echo "$want" >"$stamp"
echo "setup-venv.sh: venv ready in $((SECONDS - start)) s" >&2
echo "$venv/bin/python"
