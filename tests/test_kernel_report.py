"""The ahead-of-time kernel report: real compilation of the RG-SA, L-SA, spatial-gate and (add +) LayerNorm
kernels for sm_80 and sm_90a, and the checks that decide its exit status."""
import importlib
import json
import os
import subprocess
import sys

import pytest

from rgt_fast.kernels import report

rgsa_attention = importlib.import_module("rgt_fast.kernels.rgsa_attention")

ELEMENTWISE_KERNELS = {"_gate_norm_kernel", "_gate_conv_kernel", "_gate_conv_backward_kernel",
                       "_gate_norm_backward_kernel", "_add_norm_forward_kernel", "_add_norm_backward_kernel"}
LSA_KERNELS = {"lsa_fwd", "lsa_dq", "lsa_dkdv", "lsa_score_grad_sum"}
RGSA_KERNELS = {"_rgsa_forward_kernel", "_rgsa_backward_dq_kernel", "_rgsa_backward_dkdv_kernel",
                "_rgsa_sum_key_partials_kernel"}


def row(**overrides):
    fields = dict(module="m", kernel="k", arch="sm_80", config="c", registers=128, spill_bytes=0, shared_bytes=0,
                  mma_instructions=8, hmma=8, hgmma=0, uses_dot=True)
    return report.ReportRow(**{**fields, **overrides})


def test_rgsa_kernels_compile_for_both_archs_without_spills(tmp_path):
    """bf16 and both fp32 modes; fp16 compiles to the same code as bf16 and is left to the full report, which
    takes longer than this test may."""
    json_path = tmp_path / "report.json"
    # Run as users do, with the interpreter variable still set: the report must compile regardless.
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "rgt_fast.kernels.report", "--arch", "sm_80", "--arch", "sm_90a",
         "--module", "rgsa_attention", "--config", "bf16", "--config", "fp32", "--json", str(json_path)],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "HGMMA" in result.stdout.splitlines()[0]

    rows = [report.ReportRow(**fields) for fields in json.loads(json_path.read_text())]
    assert {r.kernel for r in rows} == RGSA_KERNELS
    for arch in ("sm_80", "sm_90a"):
        assert len([r for r in rows if r.arch == arch]) == len(rows) // 2
    for r in rows:
        assert r.error is None and r.spill_bytes == 0, r
        assert 0 < r.registers <= 255 and r.shared_bytes >= 0, r
        if r.uses_dot:
            assert r.mma_instructions > 0, r
        if r.arch == "sm_80":
            assert r.hgmma == 0, r
    # bf16 forward on Hopper must reach warpgroup MMAs, not only the Ampere-style ones.
    assert any(r.hgmma > 0 for r in rows if r.arch == "sm_90a" and r.kernel == "_rgsa_forward_kernel")
    # fp32 with TF32 off is the one configuration meant to run its dots on FMA units.
    assert all("ieee" in r.config for r in rows if not r.uses_dot and r.kernel != "_rgsa_sum_key_partials_kernel")


def test_lsa_kernels_compile_for_both_archs_without_spills(tmp_path):
    """bf16 at RGT's split size and head dim, both branches, shifted and not; the fp32 modes and fp16 are left
    to the full report (about a minute more)."""
    json_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "rgt_fast.kernels.report", "--arch", "sm_80", "--arch", "sm_90a",
         "--module", "lsa_attention", "--config", "bf16", "--json", str(json_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [report.ReportRow(**fields) for fields in json.loads(json_path.read_text())]
    assert {r.kernel for r in rows} == LSA_KERNELS
    assert len(rows) == 2 * len(LSA_KERNELS) * 2 * 2  # archs x kernels x branches x shifted
    for r in rows:
        assert r.error is None and r.spill_bytes == 0 and 0 < r.registers <= 255 and r.uses_dot, r
        assert (r.hgmma > 0) if r.arch == "sm_90a" else (r.hmma > 0 and r.hgmma == 0), r


def test_elementwise_kernels_compile_for_both_archs_without_spills(tmp_path):
    """The spatial gate and the residual add + LayerNorm at RGT's width (180 channels), every dtype; the full
    report also covers the 60- and 64-channel models."""
    json_path = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "rgt_fast.kernels.report", "--arch", "sm_80", "--arch", "sm_90a",
         "--module", "spatial_gate", "--module", "add_layer_norm", "--config", "C=180", "--json", str(json_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rows = [report.ReportRow(**fields) for fields in json.loads(json_path.read_text())]
    assert {r.kernel for r in rows} == ELEMENTWISE_KERNELS
    # spatial gate: the norm and conv kernels with their maps in buffers and in place, the conv backward with and
    # without the projection's input, the norm backward, x 3 dtypes; add + LayerNorm: forward and backward (with
    # and without the projection's input), with and without the add, x 5 (dtype, residual-stream dtype) pairs
    assert len(rows) == 2 * (7 * 3 + 6 * 5)
    for r in rows:
        assert r.error is None and r.spill_bytes == 0 and 0 < r.registers <= 255 and not r.uses_dot, r


CRASHING_MODULE = """
import multiprocessing
import os

from rgt_fast.kernels._common import KernelVariant


def aot_variants():
    if multiprocessing.parent_process() is not None:
        os.abort()  # what an MLIR assertion inside triton.compile does to a worker
    return [KernelVariant(kernel="crashing_kernel", fn=None, signature={}, constexprs={}, num_warps=4,
                          num_stages=2, config="abort")]
"""


def test_a_crashing_compile_fails_only_its_own_row(tmp_path, monkeypatch):
    (tmp_path / "crashing_kernels.py").write_text(CRASHING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers inherit sys.path
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sum_kernel = next(index for index, variant in enumerate(rgsa_attention.aot_variants())
                      if variant.kernel == "_rgsa_sum_key_partials_kernel")
    tasks = [("crashing_kernels", 0, "sm_80"), ("rgt_fast.kernels.rgsa_attention", sum_kernel, "sm_80")]
    crashed, compiled = report._compile_all(tasks, jobs=1)
    assert crashed.kernel == "crashing_kernel" and "process died" in crashed.error
    assert compiled.error is None and compiled.kernel == "_rgsa_sum_key_partials_kernel" and compiled.registers > 0


def test_every_module_with_aot_variants_is_discovered():
    modules = report.kernel_modules()
    assert {"rgt_fast.kernels.rgsa_attention", "rgt_fast.kernels.lsa_attention",
            "rgt_fast.kernels.spatial_gate", "rgt_fast.kernels.add_layer_norm"} <= set(modules)
    assert "rgt_fast.kernels.report" not in modules and "rgt_fast.kernels._common" not in modules


@pytest.mark.parametrize("bad,reason", [
    (row(spill_bytes=24), "spills 24 bytes"),
    (row(mma_instructions=0, hmma=0), "no HMMA/HGMMA"),
    (row(error="the compiler process died (-6)"), "did not compile"),
])
def test_problems_flags_spills_missing_mma_and_failures(bad, reason):
    found = report.problems([row(), bad])
    assert len(found) == 1 and reason in found[0]


def test_fma_kernels_without_mma_pass():
    assert report.problems([row(uses_dot=False, mma_instructions=0, hmma=0)]) == []


@pytest.mark.parametrize("rows,status", [([row()], 0), ([row(), row(spill_bytes=4)], 1), ([], 1)])
def test_exit_status_follows_problems(monkeypatch, capsys, tmp_path, rows, status):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(report, "build_report", lambda *args: rows)
    json_path = tmp_path / "rows.json"
    assert report.main(["--arch", "sm_80", "--json", str(json_path)]) == status
    if rows:
        assert len(json.loads(json_path.read_text())) == len(rows)
        assert rows[0].kernel in capsys.readouterr().out
