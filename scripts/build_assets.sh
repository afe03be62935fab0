#!/usr/bin/env bash
# Rebuild the shipped tiny-world models from scratch, reproducibly (seeded; CPU).
#   bash scripts/build_assets.sh target    # ~2.5 h on 2 CPU cores: train (2 stages) + grade the target LLaVA
#   bash scripts/build_assets.sh drafter   # ~25 min: target-generated data, train + evaluate the drafter
#   bash scripts/build_assets.sh baselines [text|vispec|eagle ...] # ~1.5 h for all three: text-only, image-seeing EAGLE and ViSpec-style drafters,
#                                          # on the hivis drafter's data and step budget (benchmarks compare them)
#   bash scripts/build_assets.sh variants [next|qwen]  # next: ~37 min (target 17 min, drafter 20 min);
#                                          # tiny-world targets warm-started from tiny-target, graded, + a hivis drafter
# Each copies its result into hivis_testbed/assets/ with provenance.json (command, seed, commit,
# metrics, timings). Work directories go to runs/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
PY=.venv/bin/python
ASSETS=hivis_testbed/assets
step=${1:?usage: build_assets.sh target|drafter|baselines|variants}

ship() {  # ship SRC DEST METRICS_JSON SECONDS COMMAND: copy a model dir, merge metrics into provenance
  rm -rf "$2" && cp -r "$1" "$2"
  $PY - "$2" "$3" "$4" "$5" <<'PYEOF'
import json, subprocess, sys
from pathlib import Path
d, metrics, seconds, command = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
p = d / "provenance.json"
prov = json.loads(p.read_text()) if p.exists() else {}
prov.update(build_command=command, build_seconds=round(seconds),
            commit=subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip(),
            metrics=json.loads(Path(metrics).read_text()))
p.write_text(json.dumps(prov, indent=2) + "\n")
PYEOF
}

if [[ $step == target ]]; then
  t0=$(date +%s)
  # stage 1: 7000 steps of an 8000-step schedule; every token of a cell learns the cell's object
  $PY -m hivis_testbed.tinyworld.train_target --out runs/target --image-size 168 --steps 8000 --stop-at 7000 \
      --threads 1 --seed 0
  # stage 2: fresh schedule on unseen scenes; token targets from the object masks + pooled cell heads
  # (stage 1 left shapes at ~57%: features of small objects were not shape-specific enough)
  $PY -m hivis_testbed.tinyworld.train_target --out runs/target-s2 --image-size 168 --steps 3500 \
      --init-from runs/target/checkpoint.pt --aux mask --aux-weight 1.0 --lr 1e-3 --warmup 100 \
      --sample-offset 200000 --threads 2 --seed 0
  $PY -m hivis_testbed.tinyworld.evaluate runs/target-s2/model --n 200 --out runs/target-s2/metrics.json
  ship runs/target-s2/model $ASSETS/tiny-target runs/target-s2/metrics.json $(( $(date +%s) - t0 )) "bash scripts/build_assets.sh target"
elif [[ $step == drafter ]]; then
  t0=$(date +%s)
  $PY -m vllm_hivis.cli generate-data --target $ASSETS/tiny-target --out runs/drafter-data \
      --tinyworld train:0:4000 --responses greedy,sample:1.0 --shard-size 500
  $PY -m vllm_hivis.cli train --data runs/drafter-data --target $ASSETS/tiny-target --out runs/drafter \
      --recipe time-aware --unroll 4 --steps 3000 --seed 0
  $PY -m vllm_hivis.cli evaluate --target $ASSETS/tiny-target --drafter runs/drafter/drafter \
      --tinyworld test:0:100 -k 5 --out runs/drafter/metrics.json
  ship runs/drafter/drafter $ASSETS/tiny-drafter runs/drafter/metrics.json $(( $(date +%s) - t0 )) "bash scripts/build_assets.sh drafter"
elif [[ $step == baselines ]]; then
  # The shipped hivis drafter's budget: the same generated data (same command and seeds) and
  # 3000 steps of batch 16, unroll 4. Each baseline gets the strongest recipe its format allows:
  # time-aware (text-only, ViSpec-style); seq-embed for EAGLE (vLLM's EAGLE head has no step biases).
  [ -f runs/drafter-data/manifest.json ] || $PY -m vllm_hivis.cli generate-data --target $ASSETS/tiny-target \
      --out runs/drafter-data --tinyworld train:0:4000 --responses greedy,sample:1.0 --shard-size 500
  kinds=("${@:2}"); [ ${#kinds[@]} -gt 0 ] || kinds=(text vispec eagle)  # e.g. `baselines eagle`: one only
  for kind in "${kinds[@]}"; do
    t0=$(date +%s)
    recipe=time-aware; [[ $kind == eagle ]] && recipe=seq-embed
    $PY -m vllm_hivis.cli train --data runs/drafter-data --target $ASSETS/tiny-target --out runs/baseline-$kind \
        --kind $kind --recipe $recipe --unroll 4 --steps 3000 --seed 0 ${THREADS:+--threads $THREADS}
    $PY -m vllm_hivis.cli evaluate --target $ASSETS/tiny-target --drafter runs/baseline-$kind/drafter \
        --tinyworld test:0:100 -k 5 --out runs/baseline-$kind/metrics.json
    mkdir -p $ASSETS/baselines
    ship runs/baseline-$kind/drafter $ASSETS/baselines/$kind runs/baseline-$kind/metrics.json \
        $(( $(date +%s) - t0 )) "bash scripts/build_assets.sh baselines ($kind, recipe $recipe)"
  done
elif [[ $step == variants ]]; then
  kinds=("${@:2}"); [ ${#kinds[@]} -gt 0 ] || kinds=(next qwen)
  for kind in "${kinds[@]}"; do
    t0=$(date +%s)
    extra=(); [[ $kind == qwen ]] && extra=(--distill-steps 1000 --steps 600) || extra=(--steps 400)
    # (a finished run is reused: its provenance.json holds its own train_seconds)
    [ -f runs/$kind/model/provenance.json ] || $PY -m hivis_testbed.tinyworld.variants $kind --out runs/$kind \
        "${extra[@]}" --grade 40 --threads ${THREADS:-1}
    $PY -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['metrics']))" runs/$kind/model/provenance.json \
        > runs/$kind/metrics.json
    mkdir -p $ASSETS/$kind
    ship runs/$kind/model $ASSETS/$kind/target runs/$kind/metrics.json $(( $(date +%s) - t0 )) \
        "bash scripts/build_assets.sh variants ($kind target)"
    t0=$(date +%s)
    $PY -m vllm_hivis.cli generate-data --target $ASSETS/$kind/target --out runs/$kind-data \
        --tinyworld train:0:1500 --responses greedy,sample:1.0 --shard-size 250
    $PY -m vllm_hivis.cli train --data runs/$kind-data --target $ASSETS/$kind/target --out runs/$kind-drafter \
        --recipe time-aware --unroll 4 --steps 1500 --seed 0 ${THREADS:+--threads $THREADS}
    $PY -m vllm_hivis.cli evaluate --target $ASSETS/$kind/target --drafter runs/$kind-drafter/drafter \
        --tinyworld test:0:50 -k 5 --out runs/$kind-drafter/metrics.json
    ship runs/$kind-drafter/drafter $ASSETS/$kind/drafter runs/$kind-drafter/metrics.json $(( $(date +%s) - t0 )) \
        "bash scripts/build_assets.sh variants ($kind drafter)"
  done
else
  echo "usage: build_assets.sh target|drafter|baselines|variants" >&2; exit 2
fi
