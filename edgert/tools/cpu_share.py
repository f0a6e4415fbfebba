"""Who else had the cores while a benchmark ran. On a shared VM a neighbour can slow one run of a
side-by-side comparison and not the other, and the ratio then measures the neighbour (a c=1
TPOT of 1.90x against 1.37x twenty minutes later, on one machine). Two things the guest can
see are counted from /proc: the hypervisor's steal time, and the CPU time of processes other
than the measured ones (the server and the load generator). Memory-bandwidth contention from
another guest shows in neither, so a quiet reading is necessary, not sufficient."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

# Fractions of all cores' time during the window above which a run is reported as shared.
SHARED = 0.05


@dataclass(frozen=True)
class CpuShare:
    seconds: float  # wall time of the window
    steal: float  # fraction of the cores' time the hypervisor gave to other guests
    others: float  # fraction spent in processes other than the measured ones

    @property
    def shared(self) -> bool:
        return self.steal > SHARED or self.others > SHARED

    def describe(self) -> str:
        text = f"other processes {self.others:.0%}, steal {self.steal:.0%} of the cores"
        return text + (" (SHARED: another job had the cores)" if self.shared else "")


def _host() -> tuple[int, int, int]:
    """(all, busy, steal) jiffies of all CPUs. busy excludes idle, iowait and steal; guest time
    is already inside user and nice."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return sum(fields), user + nice + system + irq + softirq, steal


def _jiffies(pid: int) -> int:
    """utime + stime of a process and its reaped children; 0 once it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces or ')'
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return sum(int(x) for x in rest[11:15])  # utime stime cutime cstime


class CpuWatch:
    """Start before the measured work, `stop()` after it. `pids`: the measured processes (this
    one is always included), each alive until `stop()`; their threads count with them."""

    def __init__(self, pids: Iterable[int] = ()):
        self.pids = sorted({os.getpid(), *pids})
        self._start = self._read()

    def _read(self) -> tuple[float, tuple[int, int, int], int]:
        return os.times().elapsed, _host(), sum(_jiffies(p) for p in self.pids)

    def stop(self) -> CpuShare:
        (t0, (all0, busy0, steal0), own0), (t1, (all1, busy1, steal1), own1) = (
            self._start, self._read())
        total = max(all1 - all0, 1)
        others = max(busy1 - busy0 - (own1 - own0), 0)
        return CpuShare(t1 - t0, (steal1 - steal0) / total, others / total)
