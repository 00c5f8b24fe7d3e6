#!/usr/bin/env bash
# The several-GPU runs (full 7B FSDP, HSDP across processes, context parallelism at 64k, elastic resume), one
# part per device call (each fits the 10-minute limit); logs and JSON under $OUT/<part>/. On the device machine:
#
#   bash benchmarks/scale_out.sh fsdp4      # full 7B, FSDP over 4 GPUs (needs >= 4)
#   bash benchmarks/scale_out.sh fsdp8      # ... over 8
#   bash benchmarks/scale_out.sh hsdp       # one process per GPU, mesh.data=2 x fsdp=N/2, then plain FSDP, same GPUs
#   bash benchmarks/scale_out.sh cp64k      # 8-layer 7B-width step, one 64k row: 1 GPU, context=2, context=4
#   bash benchmarks/scale_out.sh long7b     # full 7B at 64k, configs/7b_long_context.yaml (context=2, FSDP rest)
#   bash benchmarks/scale_out.sh elastic    # 1B run saved on 4 GPUs, resumed on 2; and uninterrupted on 4
#
# GPUs: all visible ones (nvidia-smi -L); parts that need more stop with a one-line reason.
set -uo pipefail
cd "$(dirname "$0")/.."
part=${1:?"part: fsdp4 | fsdp8 | hsdp | cp64k | long7b | elastic"}
OUT=${OUT:-/tmp/scale_out}
out="$OUT/$part"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
ngpu=$(nvidia-smi -L 2>/dev/null | grep -c GPU || true)
need() { if [ "$ngpu" -lt "$1" ]; then echo "scale_out $part: needs $1 GPUs, $ngpu visible" >&2; exit 2; fi; }
bench() { python3 benchmarks/train_bench.py "$@"; }  # every call also writes its JSON under --out
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 | tee "$out/card.txt"
rc=0
case "$part" in
  fsdp4) need 4; bench --case 7b --devices 4 --steps 6 --warmup 2 --no-fwd-bwd --out "$out" || rc=1 ;;
  fsdp8) need 8; bench --case 7b --devices 8 --steps 6 --warmup 2 --no-fwd-bwd --out "$out" || rc=1 ;;
  hsdp)
    need 4; n=$(( ngpu >= 8 ? 8 : 4 ))
    bench --case 7b --processes "$n" --steps 6 --warmup 2 --no-fwd-bwd --out "$out/hsdp" mesh.data=2 \
      "mesh.fsdp=$(( n / 2 ))" || rc=1
    bench --case 7b --devices "$n" --steps 6 --warmup 2 --no-fwd-bwd --out "$out/fsdp" || rc=1 ;;
  cp64k)
    need 2
    for c in 1 2 4; do
      [ "$c" -gt "$ngpu" ] && continue
      bench --case 8layer --devices "$c" --seq 65536 --remat full --steps 4 --warmup 1 --no-fwd-bwd \
        --out "$out/context$c" "mesh.context=$c" data.document_aware=true || rc=1
    done ;;
  long7b)
    need 4
    # one 64k row per context group: global batch = GPUs / 2
    bench --case 7b --config configs/7b_long_context.yaml --devices "$ngpu" --seq 65536 --remat full --steps 3 \
      --warmup 1 --no-fwd-bwd --out "$out" "data.global_batch_size=$(( ngpu / 2 ))" || rc=1 ;;
  elastic)
    need 4
    run="$out/run" ref="$out/ref"
    rm -rf "$run" "$ref"
    common=(--config configs/1b.yaml train.progress=false data.global_batch_size=8 checkpoint.every=20
            optim.warmup_steps=10 optim.decay_steps=200)
    CUDA_VISIBLE_DEVICES=0,1,2,3 python3 train.py "${common[@]}" --steps 20 --out "$run" >"$out/run4.log" 2>&1 || rc=1
    CUDA_VISIBLE_DEVICES=0,1 python3 train.py "${common[@]}" --steps 40 --out "$run" --resume=require \
      >"$out/resume2.log" 2>&1 || rc=1
    CUDA_VISIBLE_DEVICES=0,1,2,3 python3 train.py "${common[@]}" --steps 40 --out "$ref" >"$out/ref4.log" 2>&1 || rc=1
    python3 - "$run" "$ref" <<'EOF' || rc=1
import json, sys
rows = lambda d: {r["step"]: r["loss"] for r in map(json.loads, open(f"{d}/metrics.jsonl")) if "loss" in r}
run, ref = rows(sys.argv[1]), rows(sys.argv[2])
common = sorted(set(run) & set(ref))
worst = max(abs(run[s] - ref[s]) / abs(ref[s]) for s in common)
print(f"elastic: {len(common)} steps in both runs (4 GPUs -> 2 after step 20 vs 4 throughout), "
      f"worst relative loss difference {worst:.2e}; last step {common[-1]}: {run[common[-1]]:.4f} vs {ref[common[-1]]:.4f}")
EOF
    ;;
  *) echo "scale_out: unknown part $part" >&2; exit 2 ;;
esac
echo "scale_out $part: exit $rc (logs and JSON in $out)"
exit $rc
