#!/usr/bin/env bash
# The command of a GPU slot; scripts/gpu_stage.sh (run beforehand, here) builds what it needs.
#   OUT=... scripts/gpu_check.sh preflight   call 1, carrying .whl and .gpua: environment, wheels, imports,
#                                             a quick CUDA check on random weights (no model file yet)
#   OUT=... scripts/gpu_check.sh full        call 2, carrying .whl and .gpub (.gpua is still there): the model
#                                             from its halves, cuda_check, generate and the quick benches
# Every step runs under its own timeout and the script goes on past failures; everything is tee'd into
# $OUT/gpu_check.log, results land in $OUT as JSON, and a one-screen summary ends the log.
# Local dry run (no CUDA, no torch in the system python3): KVMESH_CHECK_DEVICE=cpu KVMESH_CHECK_PYTHON=.venv/bin/python
#   KVMESH_CHECK_PIP_PYTHON=/usr/bin/python3
#   KVMESH_CHECK_ARGS=--quick OUT=/tmp/gpuout scripts/gpu_check.sh full
set -uo pipefail

MODE=${1:-full}
SELF=$(realpath "$0")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
: "${OUT:?set OUT to the folder whose files come back}"
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd)
DEVICE=${KVMESH_CHECK_DEVICE:-cuda}
abspath() {  # a command given as a path works from /tmp too (where the steps run); no symlinks resolved (venvs)
  if [[ $1 == */* ]]; then echo "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"; else echo "$1"; fi
}
export KVMESH_CHECK_PYTHON KVMESH_CHECK_PIP_PYTHON  # resolved once, for the steps this script runs as itself
KVMESH_CHECK_PYTHON=$(abspath "${KVMESH_CHECK_PYTHON:-python3}")
KVMESH_CHECK_PIP_PYTHON=$(abspath "${KVMESH_CHECK_PIP_PYTHON:-$KVMESH_CHECK_PYTHON}")
PY=$KVMESH_CHECK_PYTHON PIP_PY=$KVMESH_CHECK_PIP_PYTHON
CHECK_ARGS=${KVMESH_CHECK_ARGS:-}  # extra cuda_check arguments (a local dry run passes --quick)
SITE=/tmp/site                     # the wheels of packages the machine lacks
OVERLAY=/tmp/kvmesh-tree           # kvmesh as this work tree (symlinks, as the editable install maps it)
SPARE=/tmp/kvmesh-gpua             # a copy of .gpua made by call 1, in case the folder is gone by call 2
MODEL=/tmp/smollm2.gguf
# KVMESH_CHECK_EXTRA_PATH: a local dry run adds a folder whose sitecustomize hides what the GPU machine lacks
export KVMESH_CACHE_DIR=/tmp/kvcache PYTHONPATH="$OVERLAY:$SITE${KVMESH_CHECK_EXTRA_PATH:+:$KVMESH_CHECK_EXTRA_PATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore::FutureWarning
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
STEPS=()

step() {  # step NAME SECONDS COMMAND...: run it under a timeout, log and keep its exit code and duration
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  echo; echo "=== [$name] $(date +%T), timeout ${limit}s: $*"
  timeout -k 10 "$limit" "$@"
  rc=$?
  STEPS+=("$name $rc $((SECONDS - start)) $limit")
  echo "=== [$name] rc=$rc after $((SECONDS - start))s$( ((rc == 124 || rc == 137)) && echo ' (TIMED OUT)')"
}

env_info() {
  echo "host $(hostname), $(nproc) CPUs, $(free -g | awk '/Mem:/ {print $2}') GiB RAM, device $DEVICE"
  df -h /tmp | tail -1
  if command -v nvidia-smi > /dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
  "$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"available {torch.cuda.is_available()}, cudnn {torch.backends.cudnn.version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"bf16 {torch.cuda.is_bf16_supported()}, tf32 matmul {torch.backends.cuda.matmul.allow_tf32}")
EOF
}

install_wheels() {
  "$PIP_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$REPO"/.whl/*.whl || return
  ls "$SITE"
  # the overlay mirrors pyproject's package-dir, so the tree runs as checked out (with its data files, which
  # the wheel lacks), from any working directory
  "$PY" - "$REPO" "$OVERLAY" <<'EOF'
import shutil, sys, tomllib
from pathlib import Path
repo, overlay = Path(sys.argv[1]), Path(sys.argv[2])
dirs = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
shutil.rmtree(overlay, ignore_errors=True)
(overlay / "kvmesh").mkdir(parents=True)
for item in (repo / dirs["kvmesh"]).iterdir():
    (overlay / "kvmesh" / item.name).symlink_to(item)
for package, folder in dirs.items():
    if package != "kvmesh":
        (overlay / package.replace(".", "/")).symlink_to(repo / folder)
print(f"overlay {overlay}/kvmesh -> {repo}: {sorted(p.name for p in (overlay / 'kvmesh').iterdir())}")
EOF
}

check_imports() {
  "$PY" - <<'EOF'
import importlib, os, subprocess, sys
bad = 0
for name in ("numpy", "yaml", "tqdm", "torch", "transformers", "safetensors", "tokenizers", "jinja2", "msgpack",
             "grpc", "google.protobuf", "gguf", "redis", "kvmesh", "kvmesh.cli", "kvmesh.bench.cuda_check",
             "kvmesh.bench.engine_bench", "kvmesh.bench.kvcomm_bench", "kvmesh.bench.blend_bench"):
    try:
        module = importlib.import_module(name)
        print(f"  ok   {name:27} {getattr(module, '__version__', ''):14} {getattr(module, '__file__', '')}")
    except Exception as exc:
        bad += 1
        print(f"  FAIL {name:27} {type(exc).__name__}: {exc}")
# the wheel alone (no overlay): does it import, and does it ship the benches' workload files?
probe = "import kvmesh.bench.kvcomm_bench as k, kvmesh.bench.blend_bench as b; print(k.WORKLOADS.is_dir(), b.WORKLOADS.is_dir())"
env = dict(os.environ, PYTHONPATH=os.environ["PYTHONPATH"].split(":", 1)[1])
done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
print(f"  kvmesh wheel alone: {'imports; workloads shipped (kvcomm, blend): ' + done.stdout.strip() if done.returncode == 0 else 'FAILS: ' + done.stderr.strip().splitlines()[-1]}")
sys.exit(1 if bad else 0)
EOF
}

assemble_model() {
  local a=$REPO/.gpua/part sums=$REPO/.gpua
  [[ -f $a ]] || { a=$SPARE/part; sums=$SPARE; echo "(.gpua is gone: using call 1's copy in $SPARE)"; }
  cat "$a" "$REPO/.gpub/part" > "$MODEL" || return
  local want got
  want=$(cat "$sums/model.sha256") got=$(sha256sum "$MODEL" | cut -d' ' -f1)
  echo "$MODEL: $(stat -c %s "$MODEL") bytes (want $(cat "$sums/model.size")), sha256 $got"
  [[ $got == "$want" ]] && echo "sha256 OK" || { echo "sha256 MISMATCH: want $want"; rm -f "$MODEL"; return 1; }
}

summary() {
  echo; echo "==================== summary: $MODE on $DEVICE, $(date +%T), ${SECONDS}s ===================="
  printf '  %-12s %4s %5s %5s\n' step rc secs limit
  for entry in "${STEPS[@]}"; do
    read -r name rc secs limit <<< "$entry"
    printf '  %-12s %4s %5s %5s %s\n' "$name" "$rc" "$secs" "$limit" \
      "$( ((rc == 0)) && echo ok || { ((rc == 124 || rc == 137)) && echo TIMED-OUT || echo FAILED; })"
  done
  for json in "$OUT"/preflight.json "$OUT"/cuda_check.json; do
    [[ -f $json ]] && timeout 30 "$PY" -m kvmesh.bench.cuda_check --summarize "$json"
  done
  "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for name in ("engine_quick", "kvcomm_quick", "blend_quick"):
    path = Path(sys.argv[1]) / f"{name}.json"
    if not path.is_file():
        continue
    r = json.loads(path.read_text())
    errors = r.get("errors") or {}
    line = f"{name}: {len(r)} keys, {r.get('elapsed_s') or r.get('wall_s') or 0:.0f} s" + (f", errors {errors}" if errors else "")
    for t, v in (r.get("targets") or {}).items():
        value = "-" if v.get("value") is None else round(v["value"], 2)
        line += f"; {t} {value} {({True: 'PASS', False: 'miss'}).get(v.get('pass'), 'n/a')}"
    print(line[:300])
EOF
  echo "files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main() {
  mkdir -p /tmp/kvmesh-run && cd /tmp/kvmesh-run || exit 1  # not the repo root: its kvmesh/ would shadow the overlay
  echo "gpu_check $MODE: repo $REPO, out $OUT, python $PY, started $(date -u +%FT%TZ)"
  step env 15 "$SELF" _env_info
  if [[ $MODE == preflight ]]; then
    mkdir -p "$SPARE" && cp "$REPO"/.gpua/* "$SPARE"/ && echo "copied .gpua to $SPARE: $(ls -l "$SPARE" | tail -n +2 | wc -l) files"
  else
    step model 15 "$SELF" _assemble_model
  fi
  step wheels 25 "$SELF" _install_wheels
  step imports 25 "$SELF" _check_imports
  if [[ $MODE == preflight ]]; then
    # shellcheck disable=SC2086  # CHECK_ARGS is a list of words
    step cuda_check 120 "$PY" -m kvmesh.bench.cuda_check --device "$DEVICE" --quick --shapes tiny smollm2 \
      --json "$OUT/preflight.json" $CHECK_ARGS
  else
    # shellcheck disable=SC2086
    step cuda_check 170 "$PY" -m kvmesh.bench.cuda_check --model "$MODEL" --device "$DEVICE" --deadline-s 120 \
      --json "$OUT/cuda_check.json" $CHECK_ARGS
    step generate 30 "$PY" -m kvmesh generate "What is the capital of France?" --model "$MODEL" --device "$DEVICE" \
      --max-tokens 16
    step engine 35 "$PY" -m kvmesh bench engine --quick --device "$DEVICE" --model "$MODEL" --json "$OUT/engine_quick.json"
    step kvcomm 80 "$PY" -m kvmesh bench kvcomm --quick --device "$DEVICE" --store memory --model "$MODEL" \
      --json "$OUT/kvcomm_quick.json"
    step blend 80 "$PY" -m kvmesh bench blend --quick --device "$DEVICE" --model "$MODEL" --json "$OUT/blend_quick.json"
  fi
  summary
}

case $MODE in
  _env_info | _assemble_model | _install_wheels | _check_imports) "${MODE#_}" ;;  # one step, run by step()
  preflight | full) main 2>&1 | tee -a "$OUT/gpu_check.log" ;;
  *) echo "usage: OUT=DIR $0 preflight|full" >&2; exit 2 ;;
esac
