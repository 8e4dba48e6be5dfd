#!/usr/bin/env bash
# Run HERE before a GPU slot: builds, into git-ignored folders, what scripts/gpu_check.sh needs there.
#   .whl/   kvmesh's wheel and the pure-Python packages the GPU machine lacks (gguf, redis)
#   .gpua/  the first half of the model file, its whole size and SHA-256 (call 1 carries it)
#   .gpub/  the second half (call 2 carries it; .gpua is still there from call 1)
# One transfer carries at most 64 MiB (tracked + untracked files + carried folders), so the 98 MB GGUF
# travels in two halves. usage: scripts/gpu_stage.sh [MODEL.gguf]   (default: the bundled SmolLM2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=${1:-$("$PY" -c 'from kvmesh.workers.model_files import resolve_model_path; print(resolve_model_path())')}

rm -rf .whl .gpua .gpub
mkdir -p .whl .gpua .gpub .git/info
for p in /.whl/ /.gpua/ /.gpub/; do  # ignored locally only: .git/info/exclude, not the shared .gitignore
  grep -qxF "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude
done

# kvmesh from the work tree (its bench/workloads/*.json are not package data: gpu_check.sh runs the tree
# itself through an overlay and keeps this wheel as a packaging check)
[[ -d build ]] && had_build=1 || had_build=0
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
(( had_build )) || rm -rf build  # setuptools' in-tree scratch folder: leave the tree as it was
# the versions the venv tests with; pure Python, so the GPU machine's Python 3.12 takes them
for pkg in gguf redis; do
  version=$("$PY" -c "import importlib.metadata as m; print(m.version('$pkg'))")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pkg==$version"
done
for wheel in .whl/*.whl; do  # each must be py3-none-any; its unconditional requirements are listed to check
  tag=$(unzip -p "$wheel" '*.dist-info/WHEEL' | sed -n 's/^Tag: //p' | tr '\n' ' ')
  needs=$(unzip -p "$wheel" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
          | sed 's/[ ;(<>=!~].*//' | sort -u | tr '\n' ' ')
  echo "$(basename "$wheel"): tag $tag; requires: $needs"
  [[ $tag == *py3-none-any* ]] || { echo "ERROR: $wheel is not pure Python" >&2; exit 1; }
done

size=$(stat -c %s "$MODEL")
half=$(( (size + 1) / 2 ))
head -c "$half" "$MODEL" > .gpua/part
tail -c +"$((half + 1))" "$MODEL" > .gpub/part
sha256sum "$MODEL" | cut -d' ' -f1 > .gpua/model.sha256
echo "$size" > .gpua/model.size
cat .gpua/part .gpub/part | cmp -s - "$MODEL" || { echo "ERROR: the halves do not rebuild $MODEL" >&2; exit 1; }

# what each call sends: tracked + untracked non-ignored files, plus its carried folders
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
whl=$(du -sb .whl | cut -f1); gpua=$(du -sb .gpua | cut -f1); gpub=$(du -sb .gpub | cut -f1)
limit=$((64 << 20))
for call in "1: tree + .whl + .gpua = $((tree + whl + gpua))" "2: tree + .whl + .gpub = $((tree + whl + gpub))"; do
  total=${call##* }
  echo "call $call bytes ($(( total * 100 / limit ))% of 64 MiB)"
  (( total < limit )) || { echo "ERROR: call ${call%%:*} exceeds 64 MiB" >&2; exit 1; }
done
echo "model: $MODEL, $size bytes, sha256 $(cat .gpua/model.sha256)"
