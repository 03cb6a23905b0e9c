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
exec .venv/bin/python main.py --fname configs/demo_fmnist_vit_tiny.yaml --devices ${DEVICES:-cpu cpu} "$@"
