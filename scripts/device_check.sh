#!/usr/bin/env bash
# The device checks of a lent GPU or TPU in one run, under 8 minutes (docs/scaling.md):
# Pallas kernel vs the dense oracle at L = 1024, sorted / unsorted / xla train step, block
# sweep, sampler bench at the paper setting, the train step's MFU.
#
#   scripts/device_check.sh [OUT_DIR] [device_check.py flags]    # OUT_DIR: default $OUT,
#                                                                 # else ./device_check_out
#   scripts/device_check.sh /tmp/dc --smoke                       # CPU end-to-end check
#
# Writes OUT_DIR/device_check.json and OUT_DIR/device_check.md (the device kind named).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-device_check_out}}"
shift || true
mkdir -p "$OUT_DIR"
{ date -u; uname -a; command -v nvidia-smi >/dev/null && nvidia-smi; } > "$OUT_DIR/machine.txt" 2>&1
# The script stops starting sections after --budget_s (420 s by default); the timeout is
# the backstop for a section that hangs (the summary is rewritten after every section).
timeout 470 python scripts/device_check.py --out="$OUT_DIR" "$@"
rc=$?
[ "$rc" = 124 ] && echo "device_check.py timed out after 470 s; partial summary in $OUT_DIR" >&2
exit "$rc"
