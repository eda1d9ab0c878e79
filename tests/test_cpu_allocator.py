"""retain_freed_cpu_memory: freed feature maps are reused without page faults; the user's own settings win."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

import rgt_fast
from rgt_fast import cpu_allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates and frees two 48 MiB tensors per round (the size of a 256x256 feature map of 180 channels) and prints
# the page faults of each round. Run in a child process: the setting is process-wide and cannot be undone.
PROBE = """
import resource, sys, torch
from rgt_fast import retain_freed_cpu_memory
print(retain_freed_cpu_memory() if sys.argv[1] == "retain" else None)
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a = torch.empty(12 << 20).uniform_()
    b = a * 2
    del a, b
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES_PER_ROUND = 2 * (48 << 20) // 4096


def _probe(mode: str, **env: str) -> tuple[str, list[int]]:
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                            env={**os.environ, **env}, timeout=120)
    applied, *faults = result.stdout.split()
    return applied, [int(count) for count in faults]


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's; elsewhere the function only reports False")
def test_freed_blocks_are_reused_without_page_faults():
    _, default_faults = _probe("default")
    applied, retained_faults = _probe("retain")
    assert applied == "True"
    reused = [sum(count < PAGES_PER_ROUND // 10 for count in faults[2:]) for faults in (default_faults,
                                                                                       retained_faults)]
    # The premise: with glibc's defaults every round maps its tensors afresh and faults on each page.
    assert reused[0] == 0, default_faults
    # Retained, the heap grows to the working set within a few rounds and most later rounds fault on no page.
    # (Which early rounds still fault varies from run to run with how the heap fragments.)
    assert reused[1] >= 6, retained_faults


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's; elsewhere the function only reports False")
@pytest.mark.parametrize("variable", cpu_allocator.USER_ALLOCATOR_SETTINGS)
def test_a_users_own_malloc_setting_is_left_alone(variable):
    applied, _ = _probe("retain", **{variable: str(1 << 20)})
    assert applied == "False"


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: ("", ""))
    assert rgt_fast.retain_freed_cpu_memory() is False
