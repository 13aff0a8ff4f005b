"""run/allocator.py: the malloc settings keep freed memory in the process (no page faults on reuse)."""

import json
import os
import subprocess
import sys

import pytest

# allocate and free a 64 MB array 20 times; count the minor page faults of allocations 2..20
SCRIPT = """
import json, resource, sys
import numpy as np
from agorasim.run import allocator
applied = allocator.tune()
np.ones(8 << 20)  # first allocation: its pages are faulted in once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(19):
    np.ones(8 << 20)  # 64 MB, freed at once
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"applied": applied, "faults": after - before}))
"""


def run(mode: str) -> dict:
    env = {**os.environ, "AGORASIM_MALLOC": mode}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_heap_is_reused_where_the_default_faults_every_allocation():
    tuned, system = run("tuned"), run("system")
    assert tuned["applied"] is True and system["applied"] is False
    # glibc's default mmaps a block this size afresh each time and unmaps it on free, so every
    # allocation faults its pages in again: at least one fault per 2 MB (the kernel may back the
    # block with transparent huge pages), 16,384 per allocation with 4 KiB pages
    assert system["faults"] >= 19 * 32
    # tuned, the heap keeps the block: no fault at all after the first allocation (one per
    # allocation allowed for the interpreter's own small blocks)
    assert tuned["faults"] <= 19


def test_tune_applies_once_and_reports_it():
    from agorasim.run import allocator

    first = allocator.tune()
    assert allocator.tune() is first
