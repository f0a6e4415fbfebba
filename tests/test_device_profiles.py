"""Every device profile loads, and says where each of its numbers comes from: a source in
`sources` or an entry in `estimates`. Fast: JSON only, no model."""

from __future__ import annotations

import dataclasses

import pytest

import devices

REQUIRED = {"orin-nano-4gb", "orin-nano-8gb", "orin-nx-8gb", "orin-nx-16gb", "agx-orin-32gb",
            "agx-orin-64gb", "agx-thor", "xavier-nx", "t4-16gb", "cpu-x86-64", "cpu-aarch64"}
PRECISIONS = {"fp32", "fp16", "int8", "int4"}
NUMERIC = [f.name for f in dataclasses.fields(devices.DeviceProfile)
           if f.name not in ("sources", "estimates")]
SOFTWARE = [f"software.{f.name}" for f in dataclasses.fields(devices.Software)]
FIELDS = set(NUMERIC) | set(SOFTWARE)
PROFILES = [devices.load(n) for n in devices.names()]


def _numbers(p: devices.DeviceProfile) -> list[str]:
    """The fields of `p` that hold a number (bools are not numbers here)."""
    return [n for n in NUMERIC if isinstance(getattr(p, n), (int, float))
            and not isinstance(getattr(p, n), bool)]


def test_the_required_profiles_exist():
    assert set(devices.names()) >= REQUIRED, REQUIRED - set(devices.names())


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_every_number_has_a_source_or_is_an_estimate(p):
    assert _numbers(p), p.name
    for name in _numbers(p):
        assert name in p.sources or name in p.estimates, f"{p.name}.{name}: no source, no estimate"
    for name, v in dataclasses.asdict(p.software).items():
        if v is not None:
            key = f"software.{name}"
            assert key in p.sources or key in p.estimates, f"{p.name}.{key}: no source"


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_sources_and_estimates_name_real_fields(p):
    assert set(p.estimates) <= FIELDS, set(p.estimates) - FIELDS
    assert set(p.sources) <= FIELDS, set(p.sources) - FIELDS
    assert len(set(p.estimates)) == len(p.estimates)
    assert all(isinstance(v, str) and v.strip() for v in p.sources.values())


@pytest.mark.parametrize("p", PROFILES, ids=lambda p: p.name)
def test_precisions_and_software(p):
    assert p.precisions and set(p.precisions) <= PRECISIONS, p.precisions
    assert len(set(p.precisions)) == len(p.precisions)
    v = p.software.tensorrt
    if v is not None and int(v.split(".")[0]) < 10:
        assert p.tensorrt is False and "int4" not in p.precisions
    assert p.max_num_seqs > 0 and p.max_model_len > 0
    assert p.os_reserve_bytes >= 0 and p.cuda_context_bytes >= 0 and p.trt_workspace_bytes >= 0


@pytest.mark.parametrize("p", [p for p in PROFILES if p.kind == "jetson"], ids=lambda p: p.name)
def test_jetsons_share_memory_and_have_a_gpu(p):
    assert p.memory_shared and p.compute_capability
    assert p.memory_bytes and p.memory_bandwidth_gbps and p.software.jetpack
    assert p.cuda_context_bytes > 0 and p.os_reserve_bytes > 0


@pytest.mark.parametrize("p", [p for p in PROFILES if p.kind == "cpu"], ids=lambda p: p.name)
def test_cpu_profiles_read_this_machine(p):
    assert p.memory_bytes is None and p.cuda_context_bytes == 0
    assert p.compute_capability is None and not p.tensorrt
    assert p.software == devices.Software()
    assert p.precisions == ("int8", "int4", "fp32") and p.os_reserve_bytes == 1 << 30


def test_tensorrt_follows_the_software():
    by = {p.name: p for p in PROFILES}
    assert by["xavier-nx"].tensorrt is False and by["orin-nano-8gb"].tensorrt
    assert by["agx-thor"].tensorrt and by["t4-16gb"].tensorrt
    assert not by["t4-16gb"].memory_shared
