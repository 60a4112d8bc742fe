#!/usr/bin/env bash
# The GPU checks of issue 25 in one go, for a session lent a CUDA machine: prints the device and the versions, then
# runs every `gpu`-marked test (tests/test_gpu.py): the bf16 statistics pass and inits, 4-bit (nf4) bases with
# bitsandbytes' CUDA kernels, and the 2-process NCCL test (skipped with fewer than 2 GPUs). About 1-2 minutes on one
# GPU (71 s on 2 CPU cores); the pytest run is cut off at 280 s.
#
#   bash benchmarks/gpu_check.sh                           # python3 (or $PYTHON) on the GPU
#   LORAFA_TEST_DEVICE=cpu bash benchmarks/gpu_check.sh    # the same tests on the CPU, gloo for the 2-process one
#   bash benchmarks/gpu_check.sh -x -k bf16                # extra arguments go to pytest
#
# lorafa is imported from src/ (no install needed). Needs torch with CUDA, transformers, peft >= 0.21, safetensors,
# accelerate, tqdm and pytest; the 4-bit tests need bitsandbytes and are skipped without it. On the lent device
# machine a missing package travels as wheels in .whl/ (the device tool's README says how to download them): any
# .whl/*.whl is installed into /tmp/lorafa-site first. With $OUT set, the log is also written to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif command -v python3 >/dev/null && python3 -c "import torch" 2>/dev/null; then
    PY=python3
else
    PY=.venv/bin/python
fi

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lorafa-site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/lorafa-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
LOG=${OUT:+$OUT/gpu_check.log}
LOG=${LOG:-/dev/null}

{
"$PY" - <<'EOF'
import importlib, os, platform, sys

import torch

device = os.environ.get("LORAFA_TEST_DEVICE", "cuda")
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}; cuda available: {torch.cuda.is_available()}")
print(f"LORAFA_TEST_DEVICE={device}")
if torch.cuda.is_available():
    n = torch.cuda.device_count()
    print(f"{n} GPU(s): " + "; ".join(
        f"{i}: {torch.cuda.get_device_name(i)} (sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}, "
        f"{torch.cuda.get_device_properties(i).total_memory / 2**30:.0f} GiB)" for i in range(n)))
    print(f"bf16 supported: {torch.cuda.is_bf16_supported()}; cuDNN {torch.backends.cudnn.version()}; "
          f"NCCL {'.'.join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else 'none'}")
for name in ("transformers", "peft", "accelerate", "safetensors", "bitsandbytes", "pytest", "lorafa"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')} ({os.path.dirname(mod.__file__)})")
    except Exception as e:  # noqa: BLE001 - report and go on: the tests say what they skip
        print(f"{name}: not importable ({type(e).__name__}: {e})")
if torch.device(device).type == "cuda" and not torch.cuda.is_available():
    sys.exit("CUDA is not available: every gpu test would be skipped (LORAFA_TEST_DEVICE=cpu runs them on the CPU)")
EOF
} 2>&1 | tee "$LOG"
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || exit "$status"

timeout 280 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --durations=5 tests/test_gpu.py "$@" 2>&1 \
    | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
