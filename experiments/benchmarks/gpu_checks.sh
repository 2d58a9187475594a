#!/usr/bin/env bash
# The GPU checks in one short script (kernel tests on CUDA, a bf16 training step, the attention benchmark), for a
# CUDA machine that lacks some of the project's packages: wheels in .whl/ (see README "GPU figures") are put on
# PYTHONPATH first. Every part runs under its own time limit and writes its log to $OUT (default ./gpu_out), as it
# goes, so a part cut off by its limit still leaves what it printed. PARTS picks parts (default: all three).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$OUT/env.txt"
# Kernel tests: every test in tests/kernels, on CUDA (bf16 cases included), except the slow sm_90 cross-compile.
PARTS=${PARTS:-kernels step attention}
if [[ $PARTS == *kernels* ]]; then
  timeout ${KERNEL_S:-300} python3 -m pytest tests/kernels -m "not slow" -q -rfE --tb=short -p no:cacheprovider \
    -o addopts="" ${KERNEL_TESTS:-} >"$OUT/kernel_tests.txt" 2>&1; tail -40 "$OUT/kernel_tests.txt"
fi
# A bf16 (autocast, fp32 master weights) training step of the quickstart model, and of a wider one, beside fp32.
BIG="model.net.dim=1024 model.net.depth=8 model.net.heads=8 model.net.ffn_dim=4096 model.net.max_t=16
 model.net.max_h=32 model.net.max_w=32 data.sizes=[[64,64]] data.frames=[16] data.batch_size=8"
[[ $PARTS == *step* ]] && for size in tiny big; do
  for precision in fp32 bf16; do
    extra=""; [ $size = big ] && extra=$BIG
    timeout ${STEP_S:-60} python3 experiments/benchmarks/t2v_throughput.py --device cuda --precision $precision \
      --steps 10 --output "$OUT/t2v_${size}_${precision}.json" $extra 2>&1 | tail -3 | tee -a "$OUT/bf16_step.txt"
  done
done
# The attention benchmark (Triton vs SDPA vs FlexAttention); its JSON goes to $OUT.
if [[ $PARTS == *attention* ]]; then
  timeout ${ATTENTION_S:-300} python3 experiments/benchmarks/attention.py --seqlens ${SEQLENS:-2048 8192 32768} \
    ${ATTENTION_ARGS:-} --out "$OUT" >"$OUT/attention.txt" 2>&1; grep -v "Warning\|create_block_mask" "$OUT/attention.txt" | tail -60
fi
