"""Board health read from sysfs at scrape time: temperatures, power rails, GPU load.

On a Jetson an operator watches these next to the serving figures (a board that throttles at
its thermal limit serves slower for no reason the queue shows). Only what the kernel exposes is
reported: a machine without thermal zones, INA3221 rails or a Tegra GPU node gets no such gauge,
never a zero. Paths are relative to `root` so tests can lay out a board's tree.

- thermal zones: `class/thermal/thermal_zone*/{type,temp}` (millidegrees Celsius);
- power rails: hwmon devices named `ina3221` (Jetson's power monitor),
  `in<N>_label`, `in<N>_input` (mV) and `curr<N>_input` (mA);
- GPU load: the Tegra GPU's `load` node (per mille of busy time), under `devices/platform/`
  (`gpu.0` on JetPack 5, `bus@0/17000000.gpu` on Orin with JetPack 6) or `devices/gpu.0`;
- EMC (the DRAM controller, which decode on a Jetson saturates before the GPU): its clock
  (`kernel/debug/bpmp/debug/clk/emc/rate` on Orin, `class/devfreq/bwmgr/cur_freq` on Thor,
  `kernel/debug/clk/override.emc/clk_rate` before Orin; Hz) and its load, the activity monitor's
  average (`kernel/debug/cactmon/mc_all`, `kernel/debug/bpmp/debug/actmon/mc_all_avg_activity`
  or `kernel/actmon_avg_activity/mc_all`) over the clock in kHz, a percent: the convention
  jetson-stats (jtop) reports. Most of these live in debugfs, readable by root only: a service
  running as its own user gets the clock where sysfs has it and no load gauge, never a guess.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

GPU_LOAD_GLOBS = ("devices/platform/gpu.0/load", "devices/platform/bus@0/*.gpu/load",
                  "devices/gpu.0/load")
EMC_RATES = ("kernel/debug/bpmp/debug/clk/emc/rate", "class/devfreq/bwmgr/cur_freq",
             "kernel/debug/clk/override.emc/clk_rate")
EMC_ACTIVITY = ("kernel/debug/cactmon/mc_all", "kernel/debug/bpmp/debug/actmon/mc_all_avg_activity",
                "kernel/actmon_avg_activity/mc_all")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _number(path: Path) -> float | None:
    text = _read(path)
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def temperatures(root: Path) -> dict[str, float]:
    """Zone type -> degrees Celsius."""
    out = {}
    for zone in sorted(root.glob("class/thermal/thermal_zone*")):
        milli = _number(zone / "temp")
        if milli is not None:
            out[_read(zone / "type") or zone.name] = milli / 1000.0
    return out


def power_rails(root: Path) -> dict[str, float]:
    """Rail label -> watts, from every INA3221 channel that reports both voltage and current."""
    out = {}
    for hw in sorted(root.glob("class/hwmon/hwmon*")):
        if _read(hw / "name") != "ina3221":
            continue
        for volt in sorted(hw.glob("in*_input")):
            n = volt.name[2:-len("_input")]
            mv, ma = _number(volt), _number(hw / f"curr{n}_input")
            if mv is None or ma is None:
                continue
            label = _read(hw / f"in{n}_label") or f"{hw.name}_in{n}"
            out[label] = mv * ma / 1e6
    return out


def gpu_load(root: Path) -> float | None:
    """Fraction of time the GPU was busy (0..1), or None without a Tegra GPU node."""
    for pattern in GPU_LOAD_GLOBS:
        for path in sorted(root.glob(pattern)):
            permille = _number(path)
            if permille is not None:
                return permille / 1000.0
    return None


def _first(root: Path, paths: Iterable[str]) -> float | None:
    for path in paths:
        value = _number(root / path)
        if value is not None:
            return value
    return None


def emc(root: Path) -> tuple[float | None, float | None]:
    """(EMC clock in Hz, EMC load in percent), each None where the board does not show it."""
    rate = _first(root, EMC_RATES)
    activity = _first(root, EMC_ACTIVITY)
    if rate is None or rate <= 0 or activity is None:
        return rate if rate and rate > 0 else None, None
    return rate, activity / (rate / 1000.0)


class BoardSensors(Collector):
    def __init__(self, root: Path = Path("/sys")):
        self.root = root

    def collect(self) -> Iterable[Metric]:
        temps = temperatures(self.root)
        if temps:
            g = GaugeMetricFamily("edgert_board_temperature_celsius",
                                  "Thermal zone temperature (sysfs)", labels=["zone"])
            for zone, value in temps.items():
                g.add_metric([zone], value)
            yield g
        rails = power_rails(self.root)
        if rails:
            g = GaugeMetricFamily("edgert_board_power_watts",
                                  "Power rail draw from the INA3221 monitor (sysfs)",
                                  labels=["rail"])
            for rail, value in rails.items():
                g.add_metric([rail], value)
            yield g
        load = gpu_load(self.root)
        if load is not None:
            yield GaugeMetricFamily("edgert_board_gpu_load_ratio",
                                    "Fraction of time the Tegra GPU was busy (sysfs)", value=load)
        rate, emc_load = emc(self.root)
        if rate is not None:
            yield GaugeMetricFamily("edgert_board_emc_frequency_hertz",
                                    "DRAM controller (EMC) clock", value=rate)
        if emc_load is not None:
            yield GaugeMetricFamily("edgert_board_emc_load_percent",
                                    "DRAM controller (EMC) load: activity monitor average over "
                                    "the clock in kHz, as jetson-stats reports it",
                                    value=emc_load)
