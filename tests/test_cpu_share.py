"""The benchmarks' check that nobody else had the cores (edgert/tools/cpu_share.py), against
real busy processes: two spin for a second in one window, one of them measured. The other's CPU
time shows as other processes' share; the measured one's does not. Three watches over the same
window (measuring nobody, one spinner, both) see the same background load, so their
differences hold on a machine where other jobs run too (a CI run beside an export failed the
absolute bound this test had before)."""

from __future__ import annotations

import subprocess
import sys
import time

from edgert.tools.cpu_share import CpuWatch, _host, _jiffies

SPIN = [sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"]


def test_other_processes_count_and_measured_ones_do_not():
    measured, other = subprocess.Popen(SPIN), subprocess.Popen(SPIN)
    try:
        time.sleep(0.2)  # both started and spinning
        watches = [CpuWatch(pids) for pids in ([], [measured.pid], [measured.pid, other.pid])]
        all0, mine0, theirs0 = _host()[0], _jiffies(measured.pid), _jiffies(other.pid)
        time.sleep(1.0)
        mine = (_jiffies(measured.pid) - mine0) / (_host()[0] - all0)
        theirs = (_jiffies(other.pid) - theirs0) / (_host()[0] - all0)
        nobody, share, both = (w.stop() for w in watches)
    finally:
        for p in (measured, other):
            p.wait()
    assert mine > 0.1 and theirs > 0.1, "both spinners had a core"
    assert share.others >= 0.8 * theirs, "the unmeasured spinner counts as 'others'"
    # what measuring a process takes out of 'others' is that process's time, no more
    assert abs((nobody.others - share.others) - mine) <= 0.1, "the measured process is not 'others'"
    assert abs((share.others - both.others) - theirs) <= 0.1
    assert 0.9 < share.seconds < 2.0
    assert share.shared and "SHARED" in share.describe()
