# shellcheck shell=bash
# Sourced first by every GPU call script in bench/calls: prepares the machine (scripts/gpu_setup.sh), names the
# commit that sent the run (the device's copy of .git can be older than its files, so the caller passes it in
# MOSAIC_COMMIT) and fails early without $OUT, the folder whose files come back.
# With MOSAIC_CALLS_DRY_RUN=1 it prepares nothing, and each step prints its command, shell-quoted on one line,
# instead of running it (tests/unit/test_gpu_calls.py checks every command's flags that way).
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root" || exit 1
: "${OUT:?set OUT to the folder the results go to}"
dry_run="${MOSAIC_CALLS_DRY_RUN:-0}"
if [[ "$dry_run" != 1 ]]; then
    echo "== commit ${MOSAIC_COMMIT:-unknown (pass MOSAIC_COMMIT)} at $(date -u +%FT%TZ)"
    source scripts/gpu_setup.sh
fi

stage() {  # stage NAME CMD...: runs one step of a call, its output also in $OUT/NAME.log, timed
    local name="$1"
    shift
    if [[ "$dry_run" == 1 ]]; then
        printf '%q ' "$@"
        echo
        return 0
    fi
    echo "== $name $(date -u +%T): $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name rc=$rc in $((SECONDS - start)) s"
    return "$rc"
}

# shellcheck disable=SC2034  # the service scripts run it
SERVICE_150=(python3 -m mosaic_core.cli bench service --model qwen2.5-vl-7b --host 0.0.0.0 --max-batch-frames 128
    --warmup-s 15 --start-timeout-s 160 --data-dir /dev/shm/mosaic-data --cameras 150 --settle-s 30 --measure-s 60
    --stack-probe)
