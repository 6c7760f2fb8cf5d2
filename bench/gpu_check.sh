#!/usr/bin/env bash
# qrobust GPU check, one short run (~4 min on an H200). From the repository root, on a GPU machine
# without network: carry the wheels qrobust needs beyond torch in .whl/ (README: Performance, GPU) and run
#   bash bench/gpu_check.sh                  # DEVICE=cuda
#   DEVICE=cpu SMALL=1 WHL=/tmp/whl311 bash bench/gpu_check.sh   # local dry run of the whole script
# Installs the carried wheels to $SITE, makes the repo importable as `qrobust`,
# then runs steps a-d, each under its own timeout; a failed step prints
# "FAILED <step>" and the rest go on. Everything is tee'd to $OUT/gpu.log.
set -u
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
WHL=${WHL:-.whl}
SITE=${SITE:-/tmp/site}
PKG=${PKG:-/tmp/pkg}
WORK=${WORK:-/tmp/qrobust-gpu}
OUT=${OUT:-/tmp/qrobust-gpu-out}
SMALL=${SMALL:-0}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG=$OUT/gpu.log
: >"$LOG"

if [ "$SMALL" = 1 ]; then  # local CPU dry run: tiny sizes, same code paths
  IMAGES=24; SBS=8; SWORKERS=1; REP=1; ASIZE=64; ABATCH=4; AABATCH=2; DPC=2; DWORKERS=2; AREP=1
  ARCH_BIG=tiny_resnet; ARCH=tiny_cnn
else
  IMAGES=512; SBS=128; SWORKERS=8; REP=3; ASIZE=224; ABATCH=64; AABATCH=16; DPC=8; DWORKERS=8; AREP=3
  ARCH_BIG=resnet50; ARCH=resnet18
fi
# per-step timeouts (seconds): at most 380 s for a-d plus <= 60 s setup; expected ~4-5 min in all
TA1=${TA1:-30}; TA2=${TA2:-40}; TB1=${TB1:-50}; TB2=${TB2:-40}; TC1=${TC1:-45}; TC2=${TC2:-55}; TC3=${TC3:-50}
TD=${TD:-70}

log() { echo "$@" | tee -a "$LOG"; }
step() {  # step NAME SECONDS COMMAND...
  local name=$1 secs=$2; shift 2
  log ""
  log "===== $name (timeout ${secs}s): $*"
  local t0=$SECONDS
  set -o pipefail
  timeout -k 5 "$secs" "$@" 2>&1 | tee -a "$LOG" || log "FAILED $name (rc ${PIPESTATUS[0]})"
  set +o pipefail
  log "----- $name took $((SECONDS - t0)) s"
}

T0=$SECONDS
log "===== setup"
set -o pipefail
timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
  "$WHL"/*.whl 2>&1 | tee -a "$LOG" || log "FAILED wheel install"
set +o pipefail
mkdir -p "$PKG" && ln -sfn "$PWD" "$PKG/qrobust"
export PYTHONPATH=${EXTRA_PYTHONPATH:+$EXTRA_PYTHONPATH:}$PKG:$SITE
(command -v nvidia-smi >/dev/null && nvidia-smi -L || echo "no nvidia-smi") 2>&1 | tee -a "$LOG"
(echo "cpus $(nproc); $(free -g | awk '/Mem:/ {print $2 " GiB RAM"}'); /dev/shm: $(df -h /dev/shm | awk 'NR==2 {print $2 " size, " $4 " free"}')") 2>&1 | tee -a "$LOG"
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, os, torch
print("python", os.sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version(), "| cuda available", torch.cuda.is_available(),
      "| threads", torch.get_num_threads(), "| cpus", os.cpu_count())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0))
def imagecorruptions():  # through qrobust's mends (the bare package needs pkg_resources)
    from qrobust.generate import imagecorruptions_compat
    imagecorruptions_compat.apply()
    return importlib.import_module("imagecorruptions")
for m in ("qrobust", "zarr", "numcodecs", "webdataset", "imagecorruptions", "torchattacks", "pyautoattack",
          "cv2", "numba", "skimage", "av"):
    try:
        mod = imagecorruptions() if m == "imagecorruptions" else importlib.import_module(m)
        print(f"  {m:<16} {getattr(mod, '__version__', '?'):<12} {os.path.dirname(mod.__file__)}")
    except Exception as e:
        print(f"  {m:<16} MISSING ({type(e).__name__}: {e})")
EOF
log "setup took $((SECONDS - T0)) s"

# a. tests that use CUDA (test_score_attacks.py has no device knob; these are the suite's CUDA tests),
#    and our attacks on the device against the same attacks on the CPU (same seeds)
if [ "$DEVICE" = cpu ]; then TSEL="test_autocast_does_not_break"; else TSEL="cuda_matches_cpu"; fi
step a1-pytest-cuda "$TA1" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_quant.py -k "$TSEL"
step a2-attacks-device-vs-cpu "$TA2" "$PY" - "$DEVICE" <<'EOF'
import sys, torch
from qrobust.score.attacks import at_shape, run_attack
from qrobust.shared.models import build_model
dev = sys.argv[1]
torch.manual_seed(0)
model = build_model("tiny_resnet", 10).eval()
x = torch.rand(16, 3, 64, 64)
with torch.no_grad():
    y = model(x).argmax(1)
seeds = torch.arange(16)
mdev = build_model("tiny_resnet", 10).eval().to(dev)
mdev.load_state_dict(model.state_dict())
for name in ("fgsm-linf", "pgd-linf", "pgd-l2"):
    eps, params = at_shape(name, "middle", (3, 64, 64))
    a = run_attack(name, model, x, y, eps, seeds=seeds, params=params)
    b = run_attack(name, mdev, x.to(dev), y.to(dev), eps, seeds=seeds, params=params)
    assert b.device.type == torch.device(dev).type, b.device
    d = (a - b.cpu()).abs()
    with torch.no_grad():
        ra = (model(a).argmax(1) == y).float().mean().item()
        rb = (mdev(b).argmax(1) == y.to(dev)).float().mean().item()
    print(f"{name:<10} eps {eps:.4g}: max |cpu - {dev}| {d.max().item():.3g}, pixels differing > 1e-4: "
          f"{(d > 1e-4).float().mean().item():.2%}; robust acc cpu {ra:.3f} / {dev} {rb:.3f}")
EOF

# b. scoring throughput: streamed corpus vs the same images in memory
step b1-bench-score-$ARCH_BIG "$TB1" "$PY" bench/bench_score.py --arch "$ARCH_BIG" --images "$IMAGES" \
  --batch-size "$SBS" --workers "$SWORKERS" --repeats "$REP" --device "$DEVICE"
step b2-bench-score-$ARCH "$TB2" "$PY" bench/bench_score.py --arch "$ARCH" --images "$IMAGES" \
  --batch-size "$SBS" --workers "$SWORKERS" --repeats "$REP" --device "$DEVICE"

# c. attack throughput: ours vs torchattacks on the same device; the reference-only attacks alone
step c1-bench-attacks-$ARCH "$TC1" "$PY" bench/bench_attacks.py --arch "$ARCH" --size "$ASIZE" --batch "$ABATCH" \
  --repeats "$AREP" --device "$DEVICE" --attacks fgsm-linf pgd-linf pgd-l2
step c3-bench-attacks-alone-$ARCH "$TC3" "$PY" bench/bench_attacks.py --arch "$ARCH" --size "$ASIZE" \
  --batch "$AABATCH" --repeats 1 --device "$DEVICE" --attacks pgd-l1 apgd-l1 autoattack-linf

# d. end to end: a tiny demo corpus (clean + fog), scored with two live attacks on the device
rm -rf "$WORK" && mkdir -p "$WORK"
d_run() {
  set -e
  "$PY" -c "from qrobust.shared.demo_data import build_demo_dataset as b; b('$WORK/data', train_per_class=1, val_per_class=$DPC)"
  "$PY" -m qrobust -q generate --suite demo --source "$WORK/data/val" --out "$WORK/corpus" --only 'clean/*' \
    --only 'natural/fog-*' --workers "$DWORKERS"
  "$PY" -m qrobust -q score --corpus "$WORK/corpus" --model "$ARCH" --out "$WORK/results" --device "$DEVICE" \
    --batch-size 64 --workers 2 --attacks fgsm-linf,pgd-linf
  "$PY" -c "import json; s = json.load(open('$WORK/results/summary.json')); print('env:', {k: v for k, v in s['env'].items() if k != 'attacks'})"
}
export -f d_run; export PY WORK DPC DWORKERS ARCH DEVICE
step d-score-end-to-end "$TD" bash -c d_run

# e. distributed scoring: torchrun with 2 ranks sharing the one GPU (both LOCAL_RANK 0), against d's one process
e_run() {
  set -e
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 --no-python bash -c \
    "LOCAL_RANK=0 exec $PY -m qrobust -q score --corpus $WORK/corpus --model $ARCH --out $WORK/results2 \
     --device $DEVICE --batch-size 64 --workers 1 --attacks fgsm-linf,pgd-linf"
  "$PY" - <<'PYEOF'
import json, os, numpy as np, zarr
w = os.environ["WORK"]
a, b = (zarr.open_group(f"{w}/{r}/predictions.zarr", mode="r") for r in ("results", "results2"))
def arrays(g, prefix=""):
    for k, v in g.members():
        if hasattr(v, "members"):
            yield from arrays(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v[...]
A, B = dict(arrays(a)), dict(arrays(b))
same = sorted(k for k in A if k in B and np.array_equal(A[k], B[k]))
print(f"arrays equal: {len(same)} of {len(A)} (one process) / {len(B)} (2 ranks); differing: "
      f"{sorted(set(A) ^ set(B)) + sorted(k for k in A if k in B and not np.array_equal(A[k], B[k]))}")
sa, sb = (json.load(open(f"{w}/{r}/summary.json")) for r in ("results", "results2"))
print("summary equal except env:", {k: v for k, v in sa.items() if k != "env"} == {k: v for k, v in sb.items() if k != "env"})
PYEOF
}
export -f e_run
step e-distributed-2-ranks "${TE:-60}" bash -c e_run

# c2 (last: optional if time is short). The bigger model, same attacks
step c2-bench-attacks-$ARCH_BIG "$TC2" "$PY" bench/bench_attacks.py --arch "$ARCH_BIG" --size "$ASIZE" \
  --batch "$ABATCH" --repeats "$AREP" --device "$DEVICE" --attacks fgsm-linf pgd-linf pgd-l2

log ""
log "===== all done in $((SECONDS - T0)) s"
grep -E "^FAILED" "$LOG" || log "no step failed"
