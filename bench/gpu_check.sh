#!/usr/bin/env bash
# The GPU check (issue 14): one prepared script, planned for at most 6 minutes on one H200 (not yet run on
# a GPU: no GPU was lent to the session that wrote it); every result is a file under $OUT (default
# outputs/gpu-check/<time>/). Without a GPU it runs its CPU parts in about a minute (what CI can afford)
# and says which parts it left out.
#
#   bash bench/gpu_check.sh                  # from the repository root
#
# On the offline CUDA machine (../shared/gpu/README.md): run `bash ../shared/gpu/wheels.sh` on a
# machine with the registries first and carry .whl/ along; this script installs it when hydra is missing.
#
# Parts, each writing its own files (a failing part is recorded in status.txt; the others still run):
#   1. cuda-tests:   pytest tests/test_cuda.py (chunked == unchunked in bf16, fused KL / CE / ranking loss
#                    against float64 references on CUDA, resume exactness on CUDA)      -> pytest-cuda.txt
#   2. distill:      `rlkd distill loss=kl+rank` on the embedded default in bf16 on CUDA, and the same run on
#                    the CPU (in parallel, on the CPU cores), CR/OR side by side       -> distill-*/, distill.json
#   3. bench:        bench/run.py --quick --device cuda (ratios, TRL GKD, TRL DistillationTrainer on-policy,
#                    memory controls)                                                   -> bench.json, bench.txt
#   4. large:        bench/run.py --only large --device cuda (1.1B student, 3.2B teacher, seq 1024, full and
#                    LoRA, against TRL GKD)                                             -> large.json, large.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu-check/$(date +%Y%m%d-%H%M%S)}
if [ -e "$OUT/status.txt" ]; then  # never mix two checks' files (or refuse half of the second one's runs)
  echo "error: $OUT already holds a GPU check's results; choose another folder with OUT=..." >&2
  exit 2
fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if ! python3 -c "import hydra" 2>/dev/null && [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
: > "$OUT/status.txt"
started=$(date +%s)
part() {  # part NAME CMD...: run, record "NAME ok|FAILED (rc) SECONDS" in status.txt
  local name=$1; shift
  local t0=$(date +%s)
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  "$@" >>"$OUT/log.txt" 2>&1
  local rc=$?
  local status="ok"; [ $rc -eq 0 ] || status="FAILED (rc $rc)"
  echo "$name $status $(( $(date +%s) - t0 ))s" | tee -a "$OUT/status.txt"
}

GPU=$(python3 -c "import torch; print(int(torch.cuda.is_available()))")
python3 - > "$OUT/machine.json" <<'EOF'
import json, os, platform, torch, transformers
info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "cpus": os.cpu_count(), "cuda": torch.cuda.is_available()}
if torch.cuda.is_available():
    info.update(gpu=torch.cuda.get_device_name(0), cuda_version=torch.version.cuda,
                gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
print(json.dumps(info, indent=2))
EOF

# 1. the CUDA tests (skipped without a GPU: the run then shows them as skipped)
# (-o addopts=: the project's "-n 2" needs pytest-xdist, which the GPU image may lack)
# (deterministic cuBLAS for the resume test, set before the process touches CUDA; not for the timed parts)
part cuda-tests env CUBLAS_WORKSPACE_CONFIG=:4096:8 sh -c "python3 -m pytest -o addopts= -q -p no:cacheprovider -rs tests/test_cuda.py > '$OUT/pytest-cuda.txt' 2>&1"

# 2. the embedded default, bf16 on CUDA next to the CPU run (the CPU one in the background)
distill() {  # distill DEVICE [overrides...]
  local dev=$1; shift
  python3 -m rlkd_cli distill loss=kl+rank trainer.device="$dev" trainer.progress=false \
      hydra.run.dir="$OUT/distill-$dev" cache_dir="$OUT/cache" "$@"
}
if [ "$GPU" = 1 ]; then
  # one teacher for both runs, trained on the GPU with the tiny teacher's own settings (conf/teacher/tiny.yaml)
  part teacher python3 -m rlkd_cli sft trainer.device=cuda trainer.progress=false trainer.max_steps=400 \
      trainer.warmup_steps=30 trainer.eval_every=200 trainer.save_every=0 hydra.run.dir="$OUT/teacher" \
      cache_dir="$OUT/cache"
  teacher="$OUT/teacher/checkpoints/$(cat "$OUT/teacher/checkpoints/latest" 2>/dev/null)"
  distill cpu teacher.name_or_path="$teacher" > "$OUT/distill-cpu.log" 2>&1 &
  cpu_pid=$!
  part distill-cuda distill cuda teacher.name_or_path="$teacher"
  wait $cpu_pid; echo "distill-cpu $([ $? -eq 0 ] && echo ok || echo FAILED)" | tee -a "$OUT/status.txt"
else  # CPU only: a smoke-sized run shows the command path works; the comparison needs the GPU
  part distill-cpu-smoke distill cpu experiment=smoke
fi
python3 - "$OUT" > "$OUT/distill.json" <<'EOF'
import json, sys
from pathlib import Path
out = {}
for run in sorted(Path(sys.argv[1]).glob("distill-*/summary.json")):
    s = json.loads(run.read_text())
    out[run.parent.name] = {k: s.get(k) for k in ("device", "precision", "cr@1", "cr@2", "or@2", "or@5", "val_loss",
                                                  "train_time_s", "mem/peak_cuda_mb", "mem/peak_rss_mb")}
print(json.dumps(out, indent=2))
EOF

# 3. and 4. the benchmark (GPU: the quick size and the large models; CPU: the tiny size only)
if [ "$GPU" = 1 ]; then
  part bench sh -c "python3 bench/run.py --quick --device cuda --only ratios --only onpolicy --only memory \
      --out '$OUT/bench.json' > '$OUT/bench.txt' 2>&1"
  part large sh -c "python3 bench/run.py --only large --device cuda --out '$OUT/large.json' > '$OUT/large.txt' 2>&1"
else
  skip=""; python3 -c "import trl" 2>/dev/null || skip="--skip-trl"  # TRL is the bench extra
  part bench-tiny sh -c "python3 bench/run.py --tiny --device cpu $skip --out '$OUT/bench.json' > '$OUT/bench.txt' 2>&1"
  echo "large skipped (no GPU)" | tee -a "$OUT/status.txt"
fi
echo "done in $(( $(date +%s) - started ))s; GPU: $GPU; results in $OUT" | tee -a "$OUT/status.txt"
! grep -q FAILED "$OUT/status.txt"
