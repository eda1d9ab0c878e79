"""Ahead-of-time report: compile every Triton kernel of rgt_fast for chosen GPU archs, without a GPU.

    python -m rgt_fast.kernels.report --arch sm_80 --arch sm_90a [--json PATH] [--module NAME] [--config TEXT]

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
import multiprocessing.connection
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

_ARCH_CAPABILITY = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90, "sm_90a": 90}
_KERNEL_PACKAGE = "rgt_fast.kernels"
_TENSOR_CORE_OPCODE = re.compile(r"\b(HGMMA|HMMA)\.")
_RESOURCE = re.compile(r"\b(REG|STACK|LOCAL):(\d+)")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass
class ReportRow:
    """One kernel variant on one arch. Per thread: registers and spill bytes (stores + loads); per program:
    dynamic shared memory. ``error`` says why a variant has no measurements."""

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
    error: str | None = None


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
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        dump = _run([_binary("cuobjdump"), "-res-usage", "-sass", cubin_path])
        usage = {key: int(value) for key, value in _RESOURCE.findall(dump)}
        if "REG" not in usage:
            raise RuntimeError(f"cannot read the resource usage of {variant.kernel} for {arch}:\n{dump}")
        spill_bytes = 0
        if usage.get("STACK", 0) or usage.get("LOCAL", 0):
            # Spills live in local memory, but so may other arrays: only ptxas tells spill bytes apart. Triton
            # runs ptxas with these flags and discards its log, so the same PTX is assembled again to read it.
            ptx_path = os.path.join(workdir, "kernel.ptx")
            with open(ptx_path, "w") as f:
                f.write(compiled.asm["ptx"])
            ptxas_log = _run([get_ptxas(capability).path, "-lineinfo", "-v",
                              f"--gpu-name={sm_arch_from_capability(capability)}", ptx_path,
                              "-o", os.path.join(workdir, "ptxas.o")])
            spill_bytes = sum(int(count) for count in _SPILLS.search(ptxas_log).groups())

    opcodes = _TENSOR_CORE_OPCODE.findall(dump)
    hmma, hgmma = opcodes.count("HMMA"), opcodes.count("HGMMA")
    return ReportRow(module=module_name.rsplit(".", 1)[-1], kernel=variant.kernel, arch=arch,
                     config=variant.config, registers=usage["REG"], spill_bytes=spill_bytes,
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
        if row.error:
            found.append(f"{where} did not compile: {row.error}")
            continue
        if row.spill_bytes > 0:
            found.append(f"{where} spills {row.spill_bytes} bytes")
        if row.uses_dot and row.mma_instructions == 0:
            found.append(f"{where} has tl.dot but no HMMA/HGMMA instruction")
    return found


def format_table(rows: list[ReportRow]) -> str:
    headers = ("kernel", "arch", "config", "regs", "spill B", "smem B", "HMMA", "HGMMA", "dot", "error")
    cells = [(r.kernel, r.arch, r.config, str(r.registers), str(r.spill_bytes), str(r.shared_bytes), str(r.hmma),
              str(r.hgmma), "yes" if r.uses_dot else "no", (r.error or "")[:80]) for r in rows]
    widths = [max(len(line[i]) for line in [headers, *cells]) for i in range(len(headers))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
             for line in [headers, *cells]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def _failed_row(module_name: str, index: int, arch: str, error: str) -> ReportRow:
    try:
        variant = importlib.import_module(module_name).aot_variants()[index]
        kernel, config, uses_dot = variant.kernel, variant.config, variant.uses_dot
    except Exception:  # the variant itself may be what fails; the row must still name it
        kernel, config, uses_dot = f"variant {index}", "?", True
    return ReportRow(module=module_name.rsplit(".", 1)[-1], kernel=kernel, arch=arch, config=config, registers=0,
                     spill_bytes=0, shared_bytes=0, mma_instructions=0, hmma=0, hgmma=0, uses_dot=uses_dot,
                     error=error)


def _compile_worker(connection) -> None:
    while (message := connection.recv()) is not None:
        try:
            connection.send(("done", asdict(compile_variant(*message))))
        except Exception as error:
            connection.send(("failed", f"{type(error).__name__}: {str(error).strip()[:500]}"))


def _compile_all(tasks: list[tuple], jobs: int) -> list[ReportRow]:
    """Compile in ``jobs`` spawned processes, one task at a time each over a pipe.

    A compiler crash (an MLIR assertion aborts the whole process) then fails only the variant that caused it,
    and a fresh process takes over the remaining tasks.
    """
    context = multiprocessing.get_context("spawn")  # forking a process that has loaded torch is not safe
    pending = list(enumerate(tasks))[::-1]
    rows: dict[int, ReportRow] = {}
    running: dict = {}  # parent end of a worker's pipe -> (process, id of the task it is compiling)

    def hand_out(connection, process) -> None:
        if pending:
            task_id, task = pending.pop()
            connection.send(task)
            running[connection] = (process, task_id)
        else:
            connection.send(None)
            process.join()
            connection.close()

    def start_worker() -> None:
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_compile_worker, args=(child_end,), daemon=True)
        process.start()
        child_end.close()
        hand_out(parent_end, process)

    for _ in range(jobs):
        start_worker()
    while running:
        for connection in multiprocessing.connection.wait(list(running)):
            process, task_id = running.pop(connection)
            try:
                state, payload = connection.recv()
            except EOFError:
                process.join()
                connection.close()
                rows[task_id] = _failed_row(*tasks[task_id], error=f"the compiler process died ({process.exitcode})")
                if pending:
                    start_worker()
                continue
            rows[task_id] = ReportRow(**payload) if state == "done" else _failed_row(*tasks[task_id], error=payload)
            hand_out(connection, process)
    return [rows[task_id] for task_id in range(len(tasks))]


def build_report(archs: list[str], modules: list[str] | None = None, jobs: int | None = None,
                 configs: list[str] | None = None) -> list[ReportRow]:
    tasks = [(name, index, arch)
             for name in kernel_modules(modules)
             for index, variant in enumerate(importlib.import_module(name).aot_variants())
             if not configs or any(text in variant.config for text in configs)
             for arch in archs]
    return _compile_all(tasks, max(1, min(jobs or os.cpu_count() or 1, len(tasks))))


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
    parser.add_argument("--config", action="append", metavar="TEXT",
                        help="only variants whose config label contains TEXT (for example bf16); repeatable")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile processes (default: CPU count)")
    args = parser.parse_args(argv)

    rows = build_report(args.arch, args.module, args.jobs, args.config)
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
