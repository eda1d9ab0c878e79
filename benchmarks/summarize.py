"""Markdown tables of a run_all.py report, and each issue's performance targets checked against it.

    python benchmarks/summarize.py REPORT.json [--out SUMMARY.md]

REPORT.json is what ``benchmarks/run_all.py`` writes (``benchmarks/results/<device>-<date>.json``). The summary
lists the CUDA test files' results, one table per benchmark, and a line per target of issues 3-6 with the
measured value and "met", "missed" or "not measured". Speedups are given by wall time (the median of
triton.testing.do_bench, launch costs included) and, where the benchmark records it, by GPU kernel time.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import bench_model


def _number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_number(cell) if not isinstance(cell, str) else cell for cell in row) + " |"
              for row in rows]
    return lines


class Targets:
    """The issues' targets, each checked as it is met with a measured value (or noted as not measured)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def check(self, issue: int, what: str, value: float | None, at_least: float | None = None,
              at_most: float | None = None, unit: str = "x") -> None:
        bound = f">= {at_least:g}{unit}" if at_least is not None else f"<= {at_most:g}{unit}"
        if value is None:
            verdict, measured = "not measured", "-"
        else:
            ok = value >= at_least if at_least is not None else value <= at_most
            verdict, measured = ("met" if ok else "missed"), f"{value:.2f}{unit}"
        self.lines.append(f"| {issue} | {what} | {bound} | {measured} | {verdict} |")

    def markdown(self) -> list[str]:
        return ["| issue | target | bound | measured | verdict |", "|---|---|---|---|---|", *self.lines]


def _ratio(numerator, denominator) -> float | None:
    return numerator / denominator if numerator and denominator else None


def _rows(report: dict, script: str, key: str = "rows") -> list[dict]:
    results = report.get("benchmarks", {}).get(script, {}).get("results") or {}
    return results.get(key, [])


def rgsa_section(report: dict, targets: Targets) -> list[str]:
    rows = _rows(report, "bench_rgsa_attention.py")
    impls = ("fused", "reference", "sdpa")
    table = []
    for row in rows:
        notes = "; ".join(f"{impl}: {row[f'{impl}_error']}" for impl in impls if f"{impl}_error" in row)
        table.append([row["name"], row["shape"], row["dtype"], row["pass"],
                      *(f"{_number(row.get(f'{impl}_ms'), 3)} ({_number(row.get(f'{impl}_gpu_ms'), 3)})"
                        for impl in impls),
                      f"{_number(row.get('speedup_vs_reference'))} ({_number(row.get('gpu_speedup_vs_reference'))})",
                      f"{_number(row.get('speedup_vs_sdpa'))} ({_number(row.get('gpu_speedup_vs_sdpa'))})",
                      "/".join(_number(row.get(f"{impl}_peak_mb"), 1) for impl in impls), notes])
        if row["dtype"] != "bfloat16":
            continue
        where = f"RG-SA {row['name']} ({row['shape']})"
        for clock, prefix in (("wall", ""), ("kernel", "gpu_")):
            if row["pass"] == "fwd":
                targets.check(3, f"{where} forward vs reference, {clock} time",
                              row.get(f"{prefix}speedup_vs_reference"), at_least=3)
                targets.check(3, f"{where} forward vs SDPA, {clock} time", row.get(f"{prefix}speedup_vs_sdpa"),
                              at_least=1.3)
            else:
                targets.check(3, f"{where} forward+backward vs reference, {clock} time",
                              row.get(f"{prefix}speedup_vs_reference"), at_least=2)
        if row["pass"] == "fwd" and "output_and_lse_mb" in row:
            # 1 MiB of slack for the allocator's rounding of each block.
            targets.check(3, f"{where} forward peak extra memory over output + row statistics (MiB)",
                          None if row.get("fused_peak_mb") is None
                          else row["fused_peak_mb"] - row["output_and_lse_mb"], at_most=1, unit=" MiB")
    headers = ["name", "shape", "dtype", "pass", "fused ms (gpu)", "reference ms (gpu)", "SDPA ms (gpu)",
               "x reference (gpu)", "x SDPA (gpu)", "peak MB fused/ref/SDPA", "notes"]
    return ["## RG-SA attention (issue 3)", "", *_table(headers, table)] if rows else []


def _breakdown_table(entries: list[dict]) -> list[str]:
    return _table(["kernel", "ms", "share", "count"],
                  [[e["name"][:90], _number(e["ms"], 3), _number(e["share"]), str(e["count"])] for e in entries])


def lsa_section(report: dict, targets: Targets) -> list[str]:
    rows = _rows(report, "bench_lsa_attention.py")
    impls = ("fused", "reference", "torch_sdpa", "flex")
    table = []
    for row in rows:
        def per_impl(key, digits=3):
            return "/".join(_number(row[key].get(impl), digits) if impl in row[key]
                            else row["errors"].get(impl, "-")[:20] for impl in impls)
        table.append([row["name"], row["shape"], row["dtype"], "yes" if row["shifted"] else "no",
                      str(row.get("pass")), per_impl("ms"), per_impl("fwd_bwd_ms"),
                      _number(row.get("fwd_speedup_vs_reference")), _number(row.get("fwd_speedup_vs_best_torch")),
                      _number(row.get("fwd_bwd_speedup_vs_reference")), per_impl("peak_mb", 1)])
        if row["dtype"] != "bf16":
            continue
        where = f"L-SA {row['name']} ({row['shape']}, {'shifted' if row['shifted'] else 'unshifted'})"
        targets.check(4, f"{where} forward vs reference core", row.get("fwd_speedup_vs_reference"), at_least=4)
        targets.check(4, f"{where} forward vs best PyTorch assembly", row.get("fwd_speedup_vs_best_torch"),
                      at_least=1.5)
        targets.check(4, f"{where} forward+backward vs reference", row.get("fwd_bwd_speedup_vs_reference"),
                      at_least=2.5)
    headers = ["name", "shape", "dtype", "shifted", "parity", "fwd ms fused/ref/SDPA/flex",
               "fwd+bwd ms fused/ref/SDPA/flex", "fwd x ref", "fwd x best torch", "fwd+bwd x ref",
               "peak MB fused/ref/SDPA/flex"]
    lines = ["## L-SA attention (issue 4)", "", *_table(headers, table)] if rows else []
    for row in rows:
        for step, entries in row.get("fused_time_breakdown", {}).items():
            lines += ["", f"L-SA {row['name']} {row['shape']} {row['dtype']}, fused {step}: the kernels with the "
                      f"most GPU time", "", *_breakdown_table(entries)]
    return lines


def model_section(report: dict, targets: Targets) -> list[str]:
    rows = _rows(report, "bench_model.py", "results")
    drift = _rows(report, "bench_model.py", "low_precision_drift")
    by_name = {row["name"]: row for row in rows}
    table = []
    for row in rows:
        notes = "; ".join([row["error"]] if "error" in row else
                          [f"{label}: {row[f'{label}_error']}" for label in ("reference", "fused")
                           if f"{label}_error" in row]
                          + [f"{label} profile: {row[f'{label}_time_breakdown_failed']}"
                             for label in ("reference", "fused") if f"{label}_time_breakdown_failed" in row])
        table.append([row["name"], _number(row.get("reference_ms")), _number(row.get("fused_ms")),
                      _number(row.get("speedup")), _number(row.get("reference_peak_mb"), 0),
                      _number(row.get("fused_peak_mb"), 0),
                      _number(_ratio(row.get("fused_peak_mb"), row.get("reference_peak_mb"))),
                      _number(row.get("fused_tflops"), 1), _number(row.get("fraction_of_h100_bf16_peak"), 3),
                      f"{_number(row.get('reference_it_per_s'))} / {_number(row.get('fused_it_per_s'))}", notes])

    for name, (speedup, memory) in bench_model.TARGETS.items():
        row = by_name.get(name, {})
        targets.check(5, f"{name}: speedup", row.get("speedup"), at_least=speedup)
        targets.check(5, f"{name}: peak memory, fused / reference",
                      _ratio(row.get("fused_peak_mb"), row.get("reference_peak_mb")), at_most=memory)
    eager, graph = by_name.get(bench_model.TRAINING_ROWS["bf16"], {}), by_name.get(bench_model.GRAPH_TRAINING_ROW, {})
    speedup, memory = bench_model.TARGETS[bench_model.TRAINING_ROWS["bf16"]]
    where = f"{bench_model.GRAPH_TRAINING_ROW}: rgt-fast train's step vs the reference's eager step"
    targets.check(5, f"{where}, speedup", _ratio(eager.get("reference_ms"), graph.get("fused_ms")), at_least=speedup)
    targets.check(5, f"{where}, memory (graph pool + replay peak / eager peak)",
                  _ratio(graph.get("fused_peak_mb"), eager.get("reference_peak_mb")), at_most=memory)
    big = by_name.get(bench_model.BIG_IMAGE_ROW, {})
    fused_gib = None if big.get("fused_peak_mb") is None else big["fused_peak_mb"] / 1024
    targets.check(5, f"{bench_model.BIG_IMAGE_ROW}: fused peak memory", fused_gib,
                  at_most=bench_model.BIG_IMAGE_LIMIT_GIB, unit=" GiB")
    for name in (*bench_model.TRAINING_ROWS.values(), bench_model.GRAPH_TRAINING_ROW):
        row = by_name.get(name, {})
        targets.lines.append(f"| 6 | {name}: iterations/s, reference / fused | reported | "
                             f"{_number(row.get('reference_it_per_s'))} / {_number(row.get('fused_it_per_s'))} | "
                             f"{'measured' if row.get('fused_it_per_s') else 'not measured'} |")
    lines = []
    if rows:
        headers = ["run", "reference ms", "fused ms", "speedup", "peak MB reference", "peak MB fused",
                   "memory ratio", "fused TFLOPS", "fraction of bf16 peak", "it/s reference / fused", "notes"]
        lines += ["## Whole model (issues 5 and 6)", "", *_table(headers, table)]
    measured_drift = [d for d in drift if "error" not in d]
    if measured_drift:
        lines += ["", "Autocast drift against fp32 (8-bit levels, built-in x4 demo weights):", "",
                  *_table(["model", "dtype", "max levels", "mean levels", "PSNR vs fp32 dB", "finite"],
                          [[d["model"], d["dtype"], d["max_levels"], _number(d["mean_levels"], 4),
                            _number(d["psnr_vs_fp32_db"], 1), str(d["finite"])] for d in measured_drift])]
    lines += [f"Autocast drift failed: {d['error']}" for d in drift if "error" in d]
    for row in rows:
        for label in ("fused", "reference"):
            entries = row.get(f"{label}_time_breakdown")
            if entries:
                lines += ["", f"{row['name']}, {label}: the kernels with the most GPU time in one call", "",
                          *_breakdown_table(entries)]
    return lines


def elementwise_section(report: dict, script: str, title: str) -> list[str]:
    rows = _rows(report, script)
    table = [[row["name"], row["shape"], row["dtype"], row["pass"],
              f"{_number(row.get('fused_ms'), 3)} ({_number(row.get('fused_gpu_ms'), 3)})",
              f"{_number(row.get('reference_ms'), 3)} ({_number(row.get('reference_gpu_ms'), 3)})",
              f"{_number(row.get('speedup'))} ({_number(row.get('gpu_speedup'))})",
              f"{_number(row.get('fused_peak_mb'), 1)}/{_number(row.get('reference_peak_mb'), 1)}"] for row in rows]
    headers = ["name", "shape", "dtype", "pass", "fused ms (gpu)", "reference ms (gpu)", "speedup (gpu)",
               "peak MB fused/ref"]
    return [f"## {title}", "", *_table(headers, table)] if rows else []


def launch_overhead_section(report: dict) -> list[str]:
    rows = _rows(report, "bench_launch_overhead.py")
    table = [[row["name"], row["stage"], _number(row.get("issue_ms"), 3),
              "; ".join(f"{entry['function']} {entry['own_us_per_step']:.1f}" for entry in row.get("profile", [])[:3])]
             for row in rows]
    headers = ["op", "stage", "ms per call issued", "most own time (us per call)"]
    return ["## CPU cost of eager calls at the training shapes", "", *_table(headers, table)] if rows else []


def tile_sweep_section(report: dict) -> list[str]:
    rows = _rows(report, "sweep_tiles.py")
    table = [[row["kernel"], row["shape"], str(tuple(row["tiles"])), "yes" if row["shipped"] else "",
              _number(row.get("ms"), 3), row.get("error", _number(row.get("max_difference"), 4))[:80]]
             for row in rows]
    # Attention tiles are (BLOCK_M, BLOCK_N, warps, stages), the spatial gate's (BLOCK_T, BLOCK_C, warps).
    headers = ["kernel", "shape", "tile", "shipped", "ms", "max difference or error"]
    return ["## Tile sweep (bf16)", "", *_table(headers, table)] if rows else []


def summarize(report: dict) -> str:
    env = report.get("environment", {})
    lines = [f"# Benchmark summary: {env.get('device', '?')}", "",
             f"{env.get('date', '?')}; torch {env.get('torch', '?')}, Triton {env.get('triton', '?')}, "
             f"CUDA {env.get('cuda', '?')}; commit {env.get('commit', '?')}"
             + (" (with uncommitted changes)" if env.get("dirty") else ""), ""]
    if report.get("tests"):
        tests = [[name, str(entry.get("exit_code", "-")), _number(entry.get("seconds"), 1),
                  entry.get("summary", entry.get("skipped", "")).replace("\n", " ")[:120],
                  "; ".join(entry.get("failures", []))[:300]] for name, entry in report["tests"].items()]
        lines += ["## CUDA tests", "", *_table(["file", "exit", "seconds", "summary", "failures"], tests), ""]
    targets = Targets()
    sections = [rgsa_section(report, targets), lsa_section(report, targets), model_section(report, targets),
                elementwise_section(report, "bench_spatial_gate.py", "Spatial gate"),
                elementwise_section(report, "bench_add_layer_norm.py", "Residual add + LayerNorm"),
                launch_overhead_section(report), tile_sweep_section(report)]
    lines += ["## Targets", "", *targets.markdown(), ""]
    for section in sections:
        if section:
            lines += [*section, ""]
    incomplete = [f"- {script}: " + (entry["skipped"] if "skipped" in entry else
                                     f"exit code {entry.get('exit_code')} after {entry.get('seconds')} s")
                  for script, entry in report.get("benchmarks", {}).items()
                  if "skipped" in entry or entry.get("exit_code", 0) != 0]
    if incomplete:
        lines += ["## Benchmarks that did not finish", "", *incomplete, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="a run_all.py report")
    parser.add_argument("--out", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    try:
        report = json.loads(args.report.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"summarize: cannot read {args.report}: {err}", file=sys.stderr)
        return 2
    if not isinstance(report, dict) or "benchmarks" not in report:
        print(f"summarize: {args.report} is not a run_all.py report (it has no 'benchmarks'); make one with "
              "python benchmarks/run_all.py", file=sys.stderr)
        return 2
    text = summarize(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
