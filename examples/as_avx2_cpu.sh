#!/usr/bin/env bash
# Run a command as if this x86-64 Linux machine's CPU had AVX2 only (no AVX-512, VNNI, bf16, AMX),
# by masking CPUID (examples/as_avx2_cpu.c; needs gcc and the cpuid_fault flag of /proc/cpuinfo):
#
#   bash examples/as_avx2_cpu.sh geoseg benchmark --precision int8 --json
#   AS_AVX2_KEEP_AVX_VNNI=1 bash examples/as_avx2_cpu.sh ...   # AVX2 with AVX-VNNI
#   AS_AVX2_KEEP_AVX512=1 bash examples/as_avx2_cpu.sh ...     # Skylake-SP: AVX-512 F/CD/BW/DQ/VL, no VNNI
#
# The shared library is built in a temporary folder, removed when the command ends.
set -euo pipefail
if [ "$#" -eq 0 ]; then
    echo "usage: $0 COMMAND [ARGS...]" >&2
    exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
gcc -O2 -shared -fPIC -o "$work/as_avx2_cpu.so" "$here/as_avx2_cpu.c"
status=0
LD_PRELOAD="$work/as_avx2_cpu.so${LD_PRELOAD:+:$LD_PRELOAD}" "$@" || status=$?
exit "$status"
