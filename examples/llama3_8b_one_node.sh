#!/bin/bash
# HD-PiSSA fine-tuning of LLaMA-3.1-8B on one node with 8 GPUs: convert the HF folder once, then torchrun.
#
#   HF_DIR=/models/Llama-3.1-8B-Instruct DATA=train.jsonl bash examples/llama3_8b_one_node.sh
#   TP=2 HF_DIR=... DATA=... bash examples/llama3_8b_one_node.sh     # TP=2 x DP=4
#   DRY_RUN=1 HF_DIR=... DATA=... bash examples/llama3_8b_one_node.sh # print the commands, run nothing
#
# Settings (environment variables; flags after the script name go to the trainer last, so they
# override the ones below):
#   HF_DIR         the Hugging Face folder (config.json, *.safetensors, tokenizer)       required
#   DATA           training JSONL with "question" / "answer" fields                        required
#   VALID          held-out JSONL (optional): evaluated every 200 steps and at the end
#   EPOCHS         passes over DATA (default 1), or TRAIN_ITERS optimizer steps instead
#   WORK           where the converted base, checkpoints and merged export go (runs/llama3-8b-tpT)
#   TP             tensor-parallel size, 1 or 2 (default 1); DP = GPUS / TP
#   GPUS           GPUs on the node (default 8)
#   VIRTUAL_RANKS  slices per process (default 8 / DP, so that K = 8)
#   PYTHON         the Python with megatron_hdpissa installed (default python)
#
# K, the number of HD-PiSSA adapter slices, = DP x virtual ranks:
#   TP=1: DP=8, VIRTUAL_RANKS=1 -> K=8
#   TP=2: DP=4, VIRTUAL_RANKS=2 -> K=8 (each process trains 2 slices, each on its own
#         micro-batches: the same global batch, the same compute per step, twice the factors)
#   TP=2 with VIRTUAL_RANKS=1 gives K=4 (an update of rank up to 2rK = 128 instead of 256).
# The decomposition hands out the top r*K singular components of every targeted weight, so r*K
# must stay well under min(m, n) of the smallest one: LLaMA-3.1-8B's k_proj / v_proj are
# 1024 x 4096 (8 KV heads x 128), and r=16 x K=8 = 128 of 1024 components. Raising r or K much
# further slices ever weaker components and, at r*K = 1024, every last one of k / v.
#
# TP=1 fits: bf16 weights (16 GB) on every GPU, fp32 masters sharded over DP (4 GB at DP=8),
# factors, Adam state and activations at --seq-length 1024 x --micro-batch-size 2.
set -euo pipefail

: "${HF_DIR:?set HF_DIR to the Hugging Face folder of LLaMA-3.1-8B}"
: "${DATA:?set DATA to the training JSONL}"
: "${TP:=1}" "${GPUS:=8}" "${PYTHON:=python}"
: "${WORK:=runs/llama3-8b-tp$TP}"
if (( GPUS % TP != 0 )); then
  echo "TP=$TP does not divide GPUS=$GPUS" >&2
  exit 2
fi
DP=$((GPUS / TP))
: "${VIRTUAL_RANKS:=$(( DP >= 8 ? 1 : 8 / DP ))}"
RANK_R=16
CKPT="$WORK/base-tp$TP"

run() {  # DRY_RUN=1: print the command, shell-quoted, instead of running it
  if [[ -n ${DRY_RUN:-} ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

echo "LLaMA-3.1-8B: TP=$TP x DP=$DP on $GPUS GPUs, K = DP x VIRTUAL_RANKS = $((DP * VIRTUAL_RANKS))," \
     "r=$RANK_R, r*K=$((RANK_R * DP * VIRTUAL_RANKS))" >&2

# 1. Convert once: TP shards in Megatron's legacy layout (bf16), the tokenizer alongside.
if [[ -n ${DRY_RUN:-} || ! -f "$CKPT/latest_checkpointed_iteration.txt" ]]; then
  run "$PYTHON" tools/convert_hf_to_megatron.py --hf-dir "$HF_DIR" --save "$CKPT" \
      --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size 1 --dtype bf16 --ckpt-format torch
fi

# 2. Fine-tune.
FINETUNE_ARGS=(
  --pretrained-checkpoint "$CKPT"
  --data-path "$DATA"
  --prompt-field question --response-field answer --prompt-template alpaca
  --tensor-model-parallel-size "$TP"
  --bf16
  --seq-length 1024 --micro-batch-size 2 --global-batch-size 128
  --lr 2e-5 --min-lr 0 --lr-warmup-fraction 0.03 --lr-decay-style cosine --weight-decay 0 --clip-grad 1.0
  --hd-pissa-rank "$RANK_R" --hd-pissa-alpha "$RANK_R"
  --hd-pissa-svd randomized
  --hd-pissa-virtual-ranks "$VIRTUAL_RANKS"
  --hd-pissa-master-weights sharded-fp32
  --overlap-grad-reduce
  --save "$WORK/checkpoints" --save-interval 500
  --export-hf "$WORK/merged-hf"
  --log-interval 10 --tensorboard-dir "$WORK/tensorboard" --log-json "$WORK/log.jsonl"
  --seed 1234
)
if (( TP > 1 )); then
  FINETUNE_ARGS+=(--sequence-parallel)
fi
if [[ -n ${TRAIN_ITERS:-} ]]; then
  FINETUNE_ARGS+=(--train-iters "$TRAIN_ITERS")
else
  FINETUNE_ARGS+=(--epochs "${EPOCHS:-1}")
fi
if [[ -n ${VALID:-} ]]; then
  FINETUNE_ARGS+=(--valid-data-path "$VALID" --eval-interval 200)
fi

run "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$GPUS" \
    -m megatron_hdpissa.finetune "${FINETUNE_ARGS[@]}" "$@"
