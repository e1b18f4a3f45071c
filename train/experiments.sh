#!/usr/bin/env bash
# Issue 7's experiments on a GPU machine, stage by stage (each fits a 10-minute slot on one or two H100s).
#
#   bash train/experiments.sh smoke      # environment + a few epochs of everything (speed numbers)
#   bash train/experiments.sh classify   # CIFAR-10 data-fraction sweep (configs/sweeps/cifar10_fractions.yaml)
#   bash train/experiments.sh generate   # DiT vs DIFF-DiT vs GDA-DiT + FID-10k (configs/sweeps/cifar10_dit.yaml)
#   bash train/experiments.sh samplers   # FID-2k of each finished seed-0 DiT run under four samplers
#   bash train/experiments.sh attention  # standard + DIFF ViT on all of CIFAR-10 (seed 0), then their attention maps
#   python train/report.py runs/sweeps/cifar10_fractions runs/sweeps/cifar10_dit --out docs/results
#
# Environment: DATA_ROOT (CIFAR-10 npz directory, default ../shared/data/cifar10), JOBS_PER_GPU,
# TIME_LIMIT (seconds; unfinished runs resume on the next call), OUT (where a tarball of the small
# result files goes, default runs/out). Runs resume / skip what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?usage: train/experiments.sh smoke|classify|generate [sweep args...]}; shift || true
DATA_ROOT=${DATA_ROOT:-../shared/data/cifar10}
OUT=${OUT:-runs/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

pack() {  # the small files of finished runs: results, metrics, configs, subsets, logs, sample grids
  tar czf "$OUT/$1.tgz" --exclude='*.ckpt' --exclude='events.out.*' "${@:2}" 2>/dev/null || true
}

last_ckpt() { ls "$1/$2_f100_s0"/version_*/checkpoints/last.ckpt | tail -1; }  # sweep root, arm

case "$STAGE" in
  smoke)
    nvidia-smi --query-gpu=name,memory.total --format=csv
    $PY -c "import torch, timm, lightning, torchmetrics, diffusers, jsonargparse, triton; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, 'diffusers', diffusers.__version__, 'triton', triton.__version__, 'gpus', torch.cuda.device_count())"
    # classification: 3 kinds side by side on GPU 0, one alone on GPU 1 (2 epochs of 100%)
    $PY train/sweep.py configs/sweeps/cifar10_fractions.yaml --root runs/smoke/classify --fractions 1.0 --seeds 0 \
        --gpus 0 --jobs-per-gpu 3 -- --data.root "$DATA_ROOT" --trainer.max_epochs 2 --trainer.check_val_every_n_epoch 1 || true &
    $PY train/sweep.py configs/sweeps/cifar10_fractions.yaml --root runs/smoke/alone --fractions 1.0 --seeds 1 --arms diff \
        --gpus 1 -- --data.root "$DATA_ROOT" --trainer.max_epochs 2 --trainer.check_val_every_n_epoch 1 || true
    wait
    # generation: one DiT per GPU for 1 epoch of 10%, FID on 2000 samples vs the 50k training images
    $PY train/sweep.py configs/sweeps/cifar10_dit.yaml --root runs/smoke/generate --fractions 0.1 --arms standard diff \
        --gpus 0 1 -- --data.root "$DATA_ROOT" --trainer.max_epochs 2 --trainer.check_val_every_n_epoch 2 \
        --model.init_args.fid_num_samples 500 || true
    $PY train/attention_maps.py "$(last_ckpt runs/smoke/classify standard)" "$(last_ckpt runs/smoke/classify diff)" \
        --root "$DATA_ROOT" --layer all --out runs/smoke/attention || true
    $PY train/report.py runs/smoke/classify runs/smoke/alone runs/smoke/generate --out runs/smoke/report || true
    pack smoke runs/smoke ;;
  classify)
    $PY train/sweep.py configs/sweeps/cifar10_fractions.yaml --jobs-per-gpu "${JOBS_PER_GPU:-6}" \
        ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"} ${RATE:+--rate "$RATE"} "$@" -- --data.root "$DATA_ROOT" || true
    pack classify runs/sweeps/cifar10_fractions ;;
  generate)
    $PY train/sweep.py configs/sweeps/cifar10_dit.yaml --jobs-per-gpu "${JOBS_PER_GPU:-3}" \
        ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"} ${RATE:+--rate "$RATE"} "$@" -- --data.root "$DATA_ROOT" || true
    pack generate runs/sweeps/cifar10_dit ;;
  samplers)  # does the DiT ranking depend on the sampler? (ADM-clipped / plain DDIM, DPM-Solver++, DDPM)
    for run in runs/sweeps/cifar10_dit/*_s0; do
      ckpt=$(ls "$run"/version_*/checkpoints/last.ckpt 2>/dev/null | tail -1) || continue
      (for variant in "ddim 50 --clip-denoised" "ddim 50 --no-clip-denoised" "dpmsolver 25 --clip-denoised" \
                      "ddpm 100 --clip-denoised"; do
         read -r name steps clip <<< "$variant"
         $PY train/fid_eval.py "$ckpt" --num-samples 2000 --scheduler "$name" --steps "$steps" "$clip" \
             --data-root "$DATA_ROOT" --out "$run/samplers/${name}_${steps}_${clip#--}.json" || true
       done) &
    done
    wait
    pack samplers runs/sweeps/cifar10_dit/*/samplers ;;
  attention)  # the classification sweep's recipe and seed-0 runs at 100%, in their own root
    $PY train/sweep.py configs/sweeps/cifar10_fractions.yaml --root runs/attention --fractions 1.0 --seeds 0 \
        --arms standard diff --jobs-per-gpu 2 ${TIME_LIMIT:+--time-limit "$TIME_LIMIT"} "$@" -- --data.root "$DATA_ROOT" || true
    $PY train/attention_maps.py "$(last_ckpt runs/attention standard)" "$(last_ckpt runs/attention diff)" \
        --root "$DATA_ROOT" --layer all --indices 7 1007 2007 3007 4007 5007 6007 7007 8007 9007 \
        --out runs/attention/maps || true  # one image per class (the test split is stored class by class)
    pack attention runs/attention ;;
  *) echo "unknown stage $STAGE; accepted: smoke classify generate samplers attention" >&2; exit 2 ;;
esac
