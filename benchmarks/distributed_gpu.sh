#!/usr/bin/env bash
# dsagen.distributed on one GPU: a real NCCL group of one rank, checked and timed against the plain kernels.
#
#   benchmarks/distributed_gpu.sh OUT
#
# Run from anywhere on a machine with one CUDA GPU (an H100: about 2 minutes in all); nothing is
# fetched from the network (torchrun --standalone rendezvouses on localhost). Phases, each logged
# under OUT:
#   tests   pytest tests/test_distributed_single.py -k nccl: rows, keys, decode and training on an
#           NCCL group of one rank equal the plain kernels bitwise and dispatch the same ops
#   serving torchrun --nproc-per-node 1 benchmarks/distributed_bench.py --plain, specs/deepseek_v32_serving.toml:
#           rows and keys at 4096 queries over a 32768-token causal context (the last 4096 tokens),
#           decode at 64 requests x 32768 tokens, next_n 2 (pages of 64)
#   train   the same with specs/deepseek_v32_training.toml: sparse attention forward and backward over
#           4096 tokens (k 2048, 128 heads), the sequence on the one rank
# Each bench prints per mode the distributed and plain ms per step and their ratio (1 expected on
# one rank: the same kernels run) and writes OUT/<phase>.json. Every phase runs even when one
# before it failed; the script exits 1 if any failed, naming it and showing its log's tail.
# Knobs (environment): PYTHON (default python3), STEPS (timed steps per path, default 10).
set -euo pipefail

out=${1:?usage: benchmarks/distributed_gpu.sh OUT (a folder for the logs and JSON)}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
steps=${STEPS:-10}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$root"
export DSAGEN_CACHE_DIR=${DSAGEN_CACHE_DIR:-$out/dsagen-cache}  # generated modules: a fresh cache, written here
failed=()

preflight() {
  "$python" - <<'EOF'
import sys
import torch
import torch.distributed as dist
problems = []
if not torch.cuda.is_available():
    problems.append("torch sees no CUDA GPU")
if not (dist.is_available() and dist.is_nccl_available()):
    problems.append("this torch build has no NCCL")
if problems:
    sys.exit("distributed_gpu.sh needs one CUDA GPU and NCCL: " + "; ".join(problems))
print(f"{torch.cuda.device_count()} GPU(s); rank 0 uses {torch.cuda.get_device_name(0)}")
EOF
}

# phase NAME SECONDS CMD...: run CMD with its output in OUT/NAME.log, killed after SECONDS
phase() {
  local name=$1 limit=$2 status=0 start=$SECONDS
  shift 2
  echo "== $name: $*"
  timeout --kill-after=20 "$limit" "$@" > "$out/$name.log" 2>&1 || status=$?
  echo "   $name: exit $status after $((SECONDS - start)) s, log $out/$name.log"
  if [ "$status" -ne 0 ]; then
    [ "$status" -eq 124 ] && echo "   $name: timed out after $limit s" >&2
    tail -n 40 "$out/$name.log" | sed "s/^/   $name| /" >&2
    failed+=("$name")
  fi
}

bench() {  # bench NAME SPEC ARGS...: the distributed bench on one rank, plain path beside it
  local name=$1 spec=$2
  shift 2
  phase "$name" 300 "$python" -m torch.distributed.run --standalone --nproc-per-node 1 \
    benchmarks/distributed_bench.py --device cuda --plain --steps "$steps" --spec "$spec" --json "$out/$name.json" "$@"
  if [ -f "$out/$name.json" ]; then
    grep -E "^(mode|rows|keys|decode|train) " "$out/$name.log" || true
  fi
}

if ! preflight 2>&1 | tee "$out/preflight.log"; then
  echo "distributed_gpu.sh: preflight failed, nothing run (see $out/preflight.log)" >&2
  exit 2
fi
"$python" benchmarks/versions.py > "$out/versions.txt" 2>&1 || echo "versions.py failed (see $out/versions.txt)" >&2
cat "$out/versions.txt"
total=$SECONDS

phase tests 300 "$python" -m pytest -q -p no:cacheprovider -rs tests/test_distributed_single.py -k nccl \
  --junitxml "$out/tests.xml"
if grep -q "skipped" "$out/tests.log" && ! grep -qE "[0-9]+ passed" "$out/tests.log"; then
  echo "   tests: every NCCL test was skipped (see the reasons in $out/tests.log)" >&2
  failed+=("tests-skipped")
fi
bench serving specs/deepseek_v32_serving.toml --modes rows keys decode \
  --queries 4096 --context 32768 --batch 64 --next-n 2
bench train specs/deepseek_v32_training.toml --modes train --queries 4096 --context 4096

echo "== done in $((SECONDS - total)) s; logs and JSON in $out"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "distributed_gpu.sh: failed: ${failed[*]}" >&2
  exit 1
fi
