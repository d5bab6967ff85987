#!/usr/bin/env bash
# Trains the packaged default model (Fashion-MNIST, I-DDPM recipe) with diffcore's own trainer, then exports its
# EMA weights into the package. Usage: scripts/train_default_model.sh [OUT_DIR] [TOTAL_STEPS]
# Re-running with the same OUT_DIR resumes from the latest checkpoint.
set -euo pipefail
out=${1:-runs/fashion_mnist_default}
steps=${2:-6000}
diffcore train --preset fashion_mnist_small --data fashion_mnist \
  --schedule cosine --num-timesteps 1000 --prediction-type eps --variance-type learned_range \
  --loss-type rescaled_mse --timestep-sampler uniform \
  --batch-size 64 --lr 5e-4 --warmup-steps 200 --grad-clip 1.0 --ema-rate 0.999 --dropout 0.0 \
  --total-steps "$steps" --seed 0 --log-every 50 --checkpoint-every 250 --sample-every 1000 --sample-steps 50 \
  --out-dir "$out" --no-progress
diffcore export "$out" diffcore/pretrained/fashion_mnist
