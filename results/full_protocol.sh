#!/usr/bin/env bash
# The full-protocol run (results/README.md, "The full-protocol run"): seed 0 of Table 1's 2-Stage and
# learned-gamma rows at the paper's budget. Stage 1 for 400 epochs in runs/mnist, then the Table 1
# driver's learned-gamma trial on its epoch-400 snapshot: the 1-stage FID, stage 2 for 800 epochs with
# the 2-stage FID after 100, 200, 400 and 800 of them, and the result as `full_protocol` in
# results/mnist_table1.json. Hours, not minutes, on a CPU ("The full protocol's cost"); after any
# interruption run it again: each step resumes from its checkpoint or skips what is done.
#   bash results/full_protocol.sh        # data under ./data, or $TWOSTAGE_DATA; offline: TWOSTAGE_INCEPTION=PATH too
set -euo pipefail
{  # read whole before it runs: bash reads a script as it goes, and this one runs for a day
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
ROOT="${TWOSTAGE_DATA:-./data}"

# before the hours of training: the FID's Inception weights are found (or downloaded) now, not after
# them; and how far stage 1 is
epoch=$("$PYTHON" -c "import fid, stage1; fid.find_weights(); c = stage1.load_checkpoint('runs/mnist/stage1.pt', keys=('epoch',)); print(c['epoch'] if c else 0)")
if [ "$epoch" -lt 400 ]; then
  resume=(); [ "$epoch" -gt 0 ] && resume=(--resume)
  "$PYTHON" stage1.py --data mnist --epochs 400 --snapshots 5,10,20,30,40,60,80,100,150,200,300,400 \
      --data-root "$ROOT" ${resume[@]+"${resume[@]}"}
fi
"$PYTHON" results/table1.py --seeds 0 --decoders learned-gamma --curve runs/mnist --stage2-curve 100,200,400,800 \
    --out runs/table1-mnist-full --json results/mnist_table1.json --json-key full_protocol --data-root "$ROOT"
exit
}
