#!/usr/bin/env bash
# The main job: set up the environment, train a small LongVQ model on the built-in offline corpus
# (this Python's standard-library sources, byte level), then evaluate held-out bits per byte for the
# trained model and for the same model untrained. Extra args are config overrides, e.g.
#   bash launch/quickstart.sh train.max_steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
PYBIN=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
RUN_DIR=${RUN_DIR:-runs/quickstart}
$PYBIN -m lm.train launch/configs/quickstart.yaml "train.run_dir=$RUN_DIR" "$@"
echo
echo "== held-out evaluation (test split, first 200k bytes) =="
$PYBIN -m evals.perplexity --checkpoint "$RUN_DIR" --split test --max-tokens 200000 --no-progress --untrained --json "$RUN_DIR/eval_untrained.json"
$PYBIN -m evals.perplexity --checkpoint "$RUN_DIR" --split test --max-tokens 200000 --json "$RUN_DIR/eval_test.json"
$PYBIN - "$RUN_DIR" <<'PY'
import json, sys
d = sys.argv[1]
t, u = (json.load(open(f"{d}/eval_{n}.json")) for n in ("test", "untrained"))
print(f"bits/byte: trained {t['bpb']:.3f} vs untrained {u['bpb']:.3f}  (TensorBoard: tensorboard --logdir {d}/tb)")
PY
