"""Board gauges come from sysfs and only from sysfs: a Jetson-shaped tree gives temperatures,
rail power, GPU load and the EMC clock and load; a machine without those nodes gets no such
gauge, never a zero."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from edgert.serve.board_sensors import temperatures
from edgert.serve.metrics import ServerMetrics


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def _samples(metrics: ServerMetrics) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(metrics.render().decode())
            for s in fam.samples}


def test_a_jetson_tree(tmp_path):
    _write(tmp_path, "class/thermal/thermal_zone0/type", "cpu-thermal")
    _write(tmp_path, "class/thermal/thermal_zone0/temp", "45500")
    _write(tmp_path, "class/thermal/thermal_zone1/type", "gpu-thermal")
    _write(tmp_path, "class/thermal/thermal_zone1/temp", "44031")
    _write(tmp_path, "class/thermal/thermal_zone2/type", "broken")  # no temp: skipped
    hw = "class/hwmon/hwmon1"
    _write(tmp_path, f"{hw}/name", "ina3221")
    for n, (label, mv, ma) in enumerate([("VDD_IN", 5000, 1200), ("VDD_CPU_GPU_CV", 4984, 250),
                                         ("VDD_SOC", 4992, 480)], start=1):
        _write(tmp_path, f"{hw}/in{n}_label", label)
        _write(tmp_path, f"{hw}/in{n}_input", str(mv))
        _write(tmp_path, f"{hw}/curr{n}_input", str(ma))
    _write(tmp_path, f"{hw}/in7_input", "5000")  # a voltage without a current: skipped
    _write(tmp_path, "class/hwmon/hwmon0/name", "cpu_fan")  # not a power monitor
    _write(tmp_path, "class/hwmon/hwmon0/in1_input", "12000")
    _write(tmp_path, "class/hwmon/hwmon0/curr1_input", "100")
    _write(tmp_path, "devices/platform/bus@0/17000000.gpu/load", "372")
    m = _samples(ServerMetrics(lambda: None, sysfs=tmp_path))
    assert m[("edgert_board_temperature_celsius", (("zone", "cpu-thermal"),))] == 45.5
    assert m[("edgert_board_temperature_celsius", (("zone", "gpu-thermal"),))] == 44.031
    assert not any(k[0] == "edgert_board_temperature_celsius" and ("zone", "broken") in k[1]
                   for k in m)
    assert m[("edgert_board_power_watts", (("rail", "VDD_IN"),))] == 6.0
    assert abs(m[("edgert_board_power_watts", (("rail", "VDD_SOC"),))] - 2.39616) < 1e-9
    assert sum(1 for k in m if k[0] == "edgert_board_power_watts") == 3
    assert m[("edgert_board_gpu_load_ratio", ())] == 0.372
    assert not any(k[0].startswith("edgert_board_emc") for k in m)  # no EMC nodes laid out


@pytest.mark.parametrize(("rate", "activity"), [
    ("kernel/debug/bpmp/debug/clk/emc/rate", "kernel/debug/cactmon/mc_all"),  # Orin, root
    ("class/devfreq/bwmgr/cur_freq", "kernel/debug/bpmp/debug/actmon/mc_all_avg_activity"),
    ("kernel/debug/clk/override.emc/clk_rate", "kernel/actmon_avg_activity/mc_all"),
])
def test_emc_clock_and_load(tmp_path, rate, activity):
    _write(tmp_path, rate, "2133000000")
    m = _samples(ServerMetrics(lambda: None, sysfs=tmp_path))
    assert m[("edgert_board_emc_frequency_hertz", ())] == 2.133e9
    assert ("edgert_board_emc_load_percent", ()) not in m  # activity unreadable: no load
    _write(tmp_path, activity, str(2133000 * 37))  # 37 % of the clock's kHz
    m = _samples(ServerMetrics(lambda: None, sysfs=tmp_path))
    assert m[("edgert_board_emc_load_percent", ())] == pytest.approx(37.0)


def test_nothing_invented(tmp_path):
    names = {k[0] for k in _samples(ServerMetrics(lambda: None, sysfs=tmp_path))}
    assert not any(n.startswith("edgert_board_") for n in names)
    # and on this machine: a temperature gauge exactly when the kernel exposes a zone
    here = {k[0] for k in _samples(ServerMetrics(lambda: None))}
    assert ("edgert_board_temperature_celsius" in here) == bool(temperatures(Path("/sys")))
