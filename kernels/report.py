"""Ahead-of-time report: compile every Triton kernel of rgt_fast for chosen GPU archs, without a GPU.

    python -m rgt_fast.kernels.report --arch sm_80 --arch sm_90a [--json PATH] [--module NAME] [--jobs N]

Kernels are discovered from the ``aot_variants()`` function of each submodule of ``rgt_fast.kernels``. For
every variant and arch the report gives registers per thread, spill bytes, dynamic shared memory, and the
number of tensor-core instructions in the SASS (HMMA, plus HGMMA on sm_90a). It exits with status 1 when a
variant spills or when a variant that should run its dots on tensor cores (``uses_dot``) has none.
"""
from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

_ARCH_CAPABILITY = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_90a": 90}
_KERNEL_PACKAGE = "rgt_fast.kernels"
_TENSOR_CORE_OPCODE = re.compile(r"\b(HGMMA|HMMA)\.")
_REGISTERS = re.compile(r"\bREG:(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class ReportRow:
    module: str
    kernel: str
    arch: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    mma_instructions: int
    hmma: int
    hgmma: int
    uses_dot: bool


def kernel_modules(only: list[str] | None = None) -> list[str]:
    """Submodules of rgt_fast.kernels that define aot_variants(), optionally restricted by short names."""
    package = importlib.import_module(_KERNEL_PACKAGE)
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name == "report" or (only and info.name not in only):
            continue
        name = f"{_KERNEL_PACKAGE}.{info.name}"
        if callable(getattr(importlib.import_module(name), "aot_variants", None)):
            names.append(name)
    return names


def _binary(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_variant(module_name: str, index: int, arch: str) -> ReportRow:
    """Compile variant ``index`` of ``module_name`` for ``arch`` and measure it.

    Takes names rather than the variant so it can run in a spawned worker (Triton functions do not pickle).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    variant = importlib.import_module(module_name).aot_variants()[index]
    capability = _ARCH_CAPABILITY[arch]
    # Tensors from the PyTorch caching allocator are 16-byte aligned, which Triton's launcher would record
    # as a divisibility hint on every pointer; without it loads would not vectorise as they do at run time.
    aligned_pointers = {(position,): [["tt.divisibility", 16]]
                        for position, name in enumerate(variant.fn.arg_names)
                        if variant.signature.get(name, "").startswith("*")}
    source = ASTSource(fn=variant.fn, signature=variant.signature, constexprs=variant.constexprs,
                       attrs=aligned_pointers)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages,
                                       **variant.extra_options})

    with tempfile.TemporaryDirectory() as workdir:
        cubin_path = os.path.join(workdir, "kernel.cubin")
        ptx_path = os.path.join(workdir, "kernel.ptx")
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        with open(ptx_path, "w") as f:
            f.write(compiled.asm["ptx"])
        resources = _run([_binary("cuobjdump"), "-res-usage", cubin_path])
        sass = _run([_binary("cuobjdump"), "-sass", cubin_path])
        # Triton runs ptxas with these flags and discards its log; rerunning it is the only way to read the
        # spill counts, and the same PTX and flags give the same allocation as the cubin above.
        ptxas_log = _run([get_ptxas(capability).path, "-lineinfo", "-v",
                          f"--gpu-name={sm_arch_from_capability(capability)}", ptx_path,
                          "-o", os.path.join(workdir, "ptxas.o")])

    registers = _REGISTERS.search(resources)
    spills = _SPILLS.search(ptxas_log)
    if registers is None or spills is None:
        raise RuntimeError(f"cannot read resource usage of {variant.kernel} for {arch}:\n{resources}\n{ptxas_log}")
    opcodes = _TENSOR_CORE_OPCODE.findall(sass)
    hmma, hgmma = opcodes.count("HMMA"), opcodes.count("HGMMA")
    return ReportRow(module=module_name.rsplit(".", 1)[-1], kernel=variant.kernel, arch=arch,
                     config=variant.config, registers=int(registers.group(1)),
                     spill_bytes=int(spills.group(1)) + int(spills.group(2)),
                     shared_bytes=int(compiled.metadata.shared), mma_instructions=hmma + hgmma,
                     hmma=hmma, hgmma=hgmma, uses_dot=variant.uses_dot)


def _run(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return result.stdout + result.stderr


def problems(rows: list[ReportRow]) -> list[str]:
    """Why the report fails: spills, and dot kernels the compiler left without tensor-core instructions."""
    found = []
    for row in rows:
        where = f"{row.kernel} [{row.config}] on {row.arch}"
        if row.spill_bytes > 0:
            found.append(f"{where} spills {row.spill_bytes} bytes")
        if row.uses_dot and row.mma_instructions == 0:
            found.append(f"{where} has tl.dot but no HMMA/HGMMA instruction")
    return found


def format_table(rows: list[ReportRow]) -> str:
    headers = ("kernel", "arch", "config", "regs", "spill B", "smem B", "HMMA", "HGMMA", "dot")
    cells = [(r.kernel, r.arch, r.config, str(r.registers), str(r.spill_bytes), str(r.shared_bytes), str(r.hmma),
              str(r.hgmma), "yes" if r.uses_dot else "no") for r in rows]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(headers))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
             for line in [headers, *cells]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def build_report(archs: list[str], modules: list[str] | None = None, jobs: int | None = None) -> list[ReportRow]:
    tasks = [(name, index, arch)
             for name in kernel_modules(modules)
             for index in range(len(importlib.import_module(name).aot_variants()))
             for arch in archs]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    if jobs == 1:
        return [compile_variant(*task) for task in tasks]
    # Spawned workers import the kernels afresh; forking a process that has loaded torch is not safe.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(compile_variant, *zip(*tasks)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        # Under the interpreter @triton.jit yields functions that cannot be compiled, and the kernels' INTERPRET
        # constexpr would be set: rerun in a fresh process without the variable.
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "rgt_fast.kernels.report", *argv], env=env).returncode

    parser = argparse.ArgumentParser(prog="python -m rgt_fast.kernels.report", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", choices=sorted(_ARCH_CAPABILITY), required=True,
                        help="target architecture; repeat for several")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    parser.add_argument("--module", action="append", metavar="NAME",
                        help="only this submodule of rgt_fast.kernels (for example rgsa_attention); repeatable")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    args = parser.parse_args(argv)

    rows = build_report(args.arch, args.module, args.jobs)
    if not rows:
        print("no kernel variants found", file=sys.stderr)
        return 1
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(row) for row in rows], f, indent=1)
    found = problems(rows)
    for problem in found:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
