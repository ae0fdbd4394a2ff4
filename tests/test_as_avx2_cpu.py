"""examples/as_avx2_cpu.sh: a command run as if this CPU had AVX2 only (CPUID masked), as the int8 figures for
AVX2-only CPUs were measured. Runs where the kernel offers CPUID faulting and gcc is installed (this
project's machines); elsewhere it is skipped."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "as_avx2_cpu.sh"
FLAGS = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or "cpuid_fault" not in FLAGS or shutil.which("gcc") is None,
    reason="needs x86-64 Linux with CPUID faulting and gcc")

PROBE = """
import numpy, torch
try:
    from numpy._core._multiarray_umath import __cpu_features__ as f
except ImportError:
    from numpy.core._multiarray_umath import __cpu_features__ as f
from geoseg.devices import cpu_has_amx, cpu_supports_bf16
from geoseg.quantize import _u8s8_probe, u8s8_saturates
print(torch.backends.cpu.get_cpu_capability(), f["AVX2"], f["AVX512F"], cpu_supports_bf16(), cpu_has_amx(),
      u8s8_saturates(), *sorted(set(_u8s8_probe().ravel().tolist())))
"""


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def test_libraries_see_avx2_only_and_int8_takes_seven_bit_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    r = _run(sys.executable, "-c", PROBE, env={"TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    # torch's kernels and numpy's dispatch see AVX2 and no AVX-512; geoseg sees no bf16 or AMX (so
    # --precision auto runs fp32), and ONNX Runtime's u8 x s8 products saturate (int8: 7-bit weights).
    assert r.stdout.split() == ["AVX2", "True", "False", "False", "False", "True", "1048544"]  # 32 x 32,767
    assert list(tmp_path.iterdir()) == []  # the shared library's folder is gone


@pytest.mark.parametrize("keep, flag, seen", [
    # AVX2 with AVX-VNNI (Alder Lake): VNNI adds in int32, so the products are exact.
    ("AS_AVX2_KEEP_AVX_VNNI", "avx_vnni", ["AVX2", "True", "False", "False", "False", "False", "2072640"]),
    # A Skylake-SP server: AVX-512 without VNNI still clips its product pairs.
    ("AS_AVX2_KEEP_AVX512", "avx512bw", ["AVX512", "True", "True", "False", "False", "True", "1048544"]),
])
def test_what_a_kept_extension_changes(keep, flag, seen):
    if flag not in FLAGS:
        pytest.skip(f"this CPU has no {flag} to keep")
    pytest.importorskip("onnxruntime")
    r = _run(sys.executable, "-c", PROBE, env={keep: "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == seen


def test_exit_status_and_usage():
    assert _run(sys.executable, "-c", "raise SystemExit(7)").returncode == 7
    r = _run()
    assert r.returncode == 2 and r.stderr.strip() == f"usage: {SCRIPT} COMMAND [ARGS...]"
