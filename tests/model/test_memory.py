"""The CPU allocator setting: a freed large block stays in the process for the next batch, not unmapped."""

import os
import platform

import pytest
import torch

from model.runtime.memory import retain_freed_memory


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_large_block_stays_resident_for_reuse():
    assert retain_freed_memory()
    t = torch.ones(64 * 2**20)  # 256 MiB: far above glibc's largest mmap threshold (32 MiB)
    held = resident_bytes()
    del t
    # Unmapped (glibc's default for this size) the resident set would drop by 256 MiB; kept, it stays.
    assert resident_bytes() > held - 16 * 2**20
