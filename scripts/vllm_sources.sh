#!/usr/bin/env bash
# Put the Python sources of a vLLM release in .cache/vllm-src/<version>/ (for tests/contract):
#   bash scripts/vllm_sources.sh 0.33.0
# Downloads the GPU wheel from the package index without its dependencies and extracts its .py
# files only (nothing is installed or imported: a GPU wheel's compiled parts do not load on a CPU
# machine, and the contract tests read the sources with ast). Idempotent: skips a present release.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: vllm_sources.sh VERSION}
dest=.cache/vllm-src/$version
if [ -f "$dest/.complete" ]; then
  echo "$dest"
  exit 0
fi
wheels=.cache/wheels
mkdir -p "$wheels"
t0=$(date +%s)
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python  # the project's own pip (bootstrap.sh), not the system's
"$PY" -m pip download --disable-pip-version-check -q --no-deps "vllm==$version" -d "$wheels" 1>&2
wheel=$(ls "$wheels"/vllm-"$version"-*.whl | head -1)
rm -rf "$dest"
"$PY" - "$wheel" "$dest" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")]
    z.extractall(dest, members=names)
print(f"[vllm-sources] {len(names)} files of {wheel}", file=sys.stderr)
PY
rm -f "$wheel"
touch "$dest/.complete"
echo "[vllm-sources] vLLM $version in $dest ($(( $(date +%s) - t0 )) s)" 1>&2
echo "$dest"
