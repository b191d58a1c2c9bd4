"""Peak memory is the process's own: a run started by a process that held more must not report its parent's."""

import subprocess
import sys

import pytest


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and exec carry ru_maxrss over on Linux")
def test_a_child_process_reports_its_own_peak_not_its_parents():
    held = bytearray(512 << 20)  # this process touches 512 MiB before starting the child
    for i in range(0, len(held), 4096):
        held[i] = 1
    code = "from compress.utils import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert child < 400 << 20  # the child imports torch (~300 MiB) but never holds 512 MiB
    del held
