#!/usr/bin/env bash
# Starts `python -m af2_jax.train` on every worker of a Cloud TPU VM (single host or pod slice) with one command.
#
#   train/launch_tpu_pod.sh TPU_NAME ZONE train/configs/sft.yaml [section.key=value ...]
#
# Every worker gets the same command; jax.distributed.initialize() finds the pod from the TPU environment, each
# process reads its own slice of the data, and only process 0 writes logs, metrics and the final model (checkpoints
# are written by all processes together). The code installed on the workers is this checkout's HEAD (git archive);
# SETUP=0 skips copying and installing on later launches. Rerunning the same launch resumes from the newest
# checkpoint in run.out_dir.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [section.key=value ...]" >&2
  exit 2
fi
TPU_NAME=$1
ZONE=$2
CONFIG=$3
shift 3
OVERRIDES="$*"
SETUP=${SETUP:-1}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

if [ "$SETUP" = 1 ]; then
  archive=$(mktemp -d)/af2-jax.tar.gz
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "$archive" HEAD
  gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME":af2-jax.tar.gz --zone "$ZONE" --worker=all
  ssh_all "mkdir -p af2-jax && tar -xzf af2-jax.tar.gz -C af2-jax && cd af2-jax && python3 -m venv .venv \
    && .venv/bin/pip install -q -c constraints.txt -e '.[tpu]'"
fi
run="cd af2-jax && .venv/bin/python -m af2_jax.train --config $CONFIG $OVERRIDES 2>&1 | tee -a train-\$(hostname).log"
ssh_all "$run"
