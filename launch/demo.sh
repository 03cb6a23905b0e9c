#!/usr/bin/env bash
# The demo: I-JEPA pretraining of a small ViT on the full Fashion-MNIST train set (60,000 real
# images, offline) on 2 CPU ranks. Re-running resumes from logs/demo_fmnist/jepa-latest.pth.tar;
# extra arguments are config overrides (e.g. optimization.epochs=5) or replace the devices
# (DEVICES="cuda:0 cuda:1").
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
# Shards of both splits (the test split is for evaluation); a subset left by an older demo
# (fewer samples than the split) is regenerated.
for split in train test; do
  want=$([ "$split" = train ] && echo 60000 || echo 10000)
  have=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['num_samples'])" \
         "data/fmnist/fmnist-$split-index.json" 2>/dev/null || echo 0)
  if [ "$have" != "$want" ]; then
    .venv/bin/python -m ijepa_scale.cli fashion-mnist --out data/fmnist --split "$split" \
      --num-shards "$([ "$split" = train ] && echo 8 || echo 2)"
  fi
done
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# The config trains in bfloat16, which halves the step on CPUs with bf16 units (AVX512-BF16, AMX) and is
# several times slower on CPUs without them: those train in float32 (a later override still wins).
dtype=()
if [[ "${DEVICES:-cpu}" == cpu* ]] && ! grep -qwsE 'avx512_bf16|amx_bf16' /proc/cpuinfo; then
  echo "demo: this CPU has no bfloat16 units; training in float32 (slower than the demo's 15 minutes)"
  dtype=(distributed.dtype=float32)
fi
folder=logs/demo_fmnist
for arg in "$@"; do [[ "$arg" == logging.folder=* ]] && folder=${arg#logging.folder=} && folder=${folder%/}; done
.venv/bin/python main.py --fname configs/demo_fmnist_vit_tiny.yaml --devices ${DEVICES:-cpu cpu} "${dtype[@]}" "$@"
shards="--train-shards 'data/fmnist/fmnist-train-{000000..000007}.tar'"
shards+=" --val-shards 'data/fmnist/fmnist-test-{000000..000001}.tar'"
echo
echo "Next, score the encoder: linear probe and k-NN with all labels and 1/10/100 per class, beside raw pixels"
echo "and random weights (about 9 min on 2 cores):"
echo "  .venv/bin/ijepa-scale eval both --checkpoint $folder --devices cpu cpu --shots 1,10,100 --baselines $shards"
