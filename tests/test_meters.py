"""Energy meters: NVML (pynvml patched with autospec), synthetic and estimated.

Units: J, mJ, W, mW, s.
"""

from __future__ import annotations

import itertools
import logging
import math
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pynvml
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.energy import meter as meter_module
from proxy.energy import nvml as nvml_module
from proxy.energy.meter import (
    EstimatedMeter,
    MeterError,
    MeterUnavailable,
    Reading,
    SyntheticMeter,
    nvml_available,
    open_meter,
)
from proxy.energy.nvml import (
    NvmlError,
    NvmlMeter,
    NvmlNotSupported,
    NvmlUnavailable,
    visible_device_selector,
)

NVML_FUNCTIONS = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetHandleByUUID",
    "nvmlDeviceGetArchitecture",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetPowerUsage",
)


class FakeNvml:
    """The NVML functions the meter uses, each patched with autospec on the real pynvml module."""

    nvmlInit: mock.MagicMock
    nvmlShutdown: mock.MagicMock
    nvmlDeviceGetCount: mock.MagicMock
    nvmlDeviceGetHandleByIndex: mock.MagicMock
    nvmlDeviceGetHandleByUUID: mock.MagicMock
    nvmlDeviceGetArchitecture: mock.MagicMock
    nvmlDeviceGetTotalEnergyConsumption: mock.MagicMock
    nvmlDeviceGetPowerUsage: mock.MagicMock


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    """A healthy two-GPU Hopper host; tests override return values and side effects."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNvml()
    with mock.patch.object(nvml_module, "pynvml", pynvml):
        patchers = [mock.patch.object(pynvml, name, autospec=True) for name in NVML_FUNCTIONS]
        for name, patcher in zip(NVML_FUNCTIONS, patchers, strict=True):
            setattr(fake, name, patcher.start())
        try:
            fake.nvmlDeviceGetCount.return_value = 2
            fake.nvmlDeviceGetHandleByIndex.side_effect = lambda index: f"handle{index}"
            fake.nvmlDeviceGetHandleByUUID.side_effect = lambda uuid: f"handle-{uuid}"
            fake.nvmlDeviceGetArchitecture.return_value = pynvml.NVML_DEVICE_ARCH_HOPPER
            fake.nvmlDeviceGetTotalEnergyConsumption.side_effect = itertools.count(1000, 250)
            fake.nvmlDeviceGetPowerUsage.return_value = 250_000
            yield fake
        finally:
            for patcher in patchers:
                patcher.stop()
    # Every test must leave NVML shut down: meters closed, refcount back to zero.
    assert nvml_module._init_count == 0


def fake_clock(values: list[float]) -> Callable[[], float]:
    """A clock returning ``values`` one call at a time."""
    return iter(values).__next__


class MutableClock:
    """A clock the test moves by hand, s."""

    def __init__(self, t_s: float = 0.0) -> None:
        self.t_s = t_s

    def __call__(self) -> float:
        return self.t_s


# NVML meter -----------------------------------------------------------------------------------


def test_counter_steps_repeat_then_jump(nvml: FakeNvml) -> None:
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = [1000, 1000, 1000, 1150, 1150, 1300]
    with NvmlMeter("cuda:0", clock=itertools.count().__next__, step_hint_s=0.05) as meter:
        assert (meter.measurement, meter.method) == ("measured", "nvml_energy_counter")
        assert meter.continuous is False
        assert meter.step_hint_s == 0.05
        readings = [meter.read() for _ in range(5)]
    assert readings == [
        Reading(1, 0.0),
        Reading(2, 0.0),
        Reading(3, 0.15),
        Reading(4, 0.15),
        Reading(5, 0.3),
    ]
    nvml.nvmlDeviceGetTotalEnergyConsumption.assert_called_with("handle0")


def test_counter_reset_carries_energy_and_invents_none(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    # open at 5000 mJ; reset to 0 after 7500 (first read after it sees 200), and again after 900.
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = [5000, 6000, 7500, 200, 900, 900, 100, 400]
    with (
        caplog.at_level(logging.WARNING, logger="proxy.energy.nvml"),
        NvmlMeter("cuda:0", clock=itertools.count().__next__) as meter,
    ):
        energies_j = [meter.read().energy_j for _ in range(7)]
    assert energies_j == [1.0, 2.5, 2.7, 3.4, 3.4, 3.5, 3.8]
    assert all(b >= a for a, b in itertools.pairwise(energies_j))
    resets = [r for r in caplog.records if "went backwards" in r.getMessage()]
    assert len(resets) == 2
    assert all(r.levelno == logging.WARNING for r in resets)


def test_a_counter_that_steps_back_without_a_reset_adds_nothing(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    """A step back by less than a restart from zero could explain (36 MJ since the driver loaded, 1 mJ
    back a second later) is a glitch: taken as a reset it would add the counter's whole total."""
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = [36_000_000, 36_001_000, 36_000_999, 36_001_500]
    with (
        caplog.at_level(logging.WARNING, logger="proxy.energy.nvml"),
        NvmlMeter("cuda:0", clock=itertools.count().__next__) as meter,
    ):
        energies_j = [meter.read().energy_j for _ in range(3)]
    assert energies_j == [1.0, 1.0, 1.5]
    assert any("stepped back" in r.getMessage() for r in caplog.records)


def test_unsupported_counter_falls_back_to_trapezoid_power(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_NotSupported()
    nvml.nvmlDeviceGetPowerUsage.side_effect = [100_000, 200_000, 300_000, 300_000, 50_000]
    with caplog.at_level(logging.WARNING, logger="proxy.energy.nvml"):
        meter = NvmlMeter("cuda:0", clock=fake_clock([10.0, 11.0, 13.0, 13.0, 13.5]))
    with meter:
        assert meter.method == "nvml_power_integration"
        assert meter.measurement == "measured"
        assert (meter.continuous, meter.step_hint_s) == (True, 0.0)
        readings = [meter.read() for _ in range(4)]
    # (100 + 200) / 2 * 1 s = 150 J; + (200 + 300) / 2 * 2 s = 500 J; + 0 s; + (300 + 50) / 2 * 0.5 s
    assert readings == [
        Reading(11.0, 150.0),
        Reading(13.0, 650.0),
        Reading(13.0, 650.0),
        Reading(13.5, 737.5),
    ]
    assert any(
        r.levelno == logging.WARNING and "integrating nvmlDeviceGetPowerUsage" in r.getMessage()
        for r in caplog.records
    )


def test_pre_volta_uses_power_integration_without_touching_the_counter(nvml: FakeNvml) -> None:
    nvml.nvmlDeviceGetArchitecture.return_value = pynvml.NVML_DEVICE_ARCH_PASCAL
    with NvmlMeter("cuda:0") as meter:
        assert meter.method == "nvml_power_integration"
    nvml.nvmlDeviceGetTotalEnergyConsumption.assert_not_called()


def test_unknown_architecture_still_tries_the_counter(nvml: FakeNvml) -> None:
    nvml.nvmlDeviceGetArchitecture.side_effect = pynvml.NVMLError_FunctionNotFound()
    with NvmlMeter("cuda:0") as meter:
        assert meter.method == "nvml_energy_counter"


def test_neither_counter_nor_power_is_unavailable(nvml: FakeNvml) -> None:
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = pynvml.NVMLError_NotSupported()
    nvml.nvmlDeviceGetPowerUsage.side_effect = pynvml.NVMLError_NotSupported()
    with pytest.raises(MeterUnavailable, match="neither"):
        NvmlMeter("cuda:0")
    assert nvml.nvmlShutdown.call_count == 1


def test_read_error_is_typed_names_device_and_function_and_keeps_cause(nvml: FakeNvml) -> None:
    cause = pynvml.NVMLError_Unknown()
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = [1000, cause, 1500]
    with NvmlMeter("cuda:1", clock=itertools.count().__next__) as meter:
        with pytest.raises(NvmlError) as info:
            meter.read()
        assert info.value.__cause__ is cause
        assert not isinstance(info.value, MeterUnavailable)
        message = str(info.value)
        assert "cuda:1" in message
        assert "nvmlDeviceGetTotalEnergyConsumption" in message
        # The failed read leaves the meter usable.
        assert meter.read().energy_j == 0.5


def test_lost_gpu_is_unavailable(nvml: FakeNvml) -> None:
    cause = pynvml.NVMLError_GpuIsLost()
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = [1000, cause]
    with NvmlMeter("cuda:0") as meter, pytest.raises(NvmlUnavailable) as info:
        meter.read()
    assert isinstance(info.value, MeterUnavailable)
    assert isinstance(info.value, NvmlError)
    assert info.value.__cause__ is cause


def test_counter_not_supported_later_is_an_error_not_a_silent_fallback(nvml: FakeNvml) -> None:
    nvml.nvmlDeviceGetTotalEnergyConsumption.side_effect = [1000, pynvml.NVMLError_NotSupported()]
    with NvmlMeter("cuda:0") as meter, pytest.raises(NvmlNotSupported):
        meter.read()


def test_read_after_close_raises(nvml: FakeNvml) -> None:
    meter = NvmlMeter("cuda:0")
    meter.close()
    with pytest.raises(MeterError, match="closed"):
        meter.read()
    assert meter.power_watts() is None


def test_power_watts(nvml: FakeNvml) -> None:
    nvml.nvmlDeviceGetPowerUsage.side_effect = [123_456, pynvml.NVMLError_Unknown()]
    with NvmlMeter("cuda:0") as meter:
        assert meter.power_watts() == 123.456
        assert meter.power_watts() is None
    nvml.nvmlDeviceGetPowerUsage.assert_called_with("handle0")


@pytest.mark.parametrize(
    ("visible", "device", "expected"),
    [
        (None, "cuda:1", 1),
        (None, "cuda", 0),
        ("2,3", "cuda:0", 2),
        ("2, 3", "cuda:1", 3),
        ("GPU-aaaa,GPU-bbbb", "cuda:1", "GPU-bbbb"),
        ("MIG-cccc", "cuda:0", "MIG-cccc"),
        ("1,-1,0", "cuda:0", 1),
    ],
)
def test_visible_device_selector(visible: str | None, device: str, expected: int | str) -> None:
    assert visible_device_selector(device, visible) == expected


@pytest.mark.parametrize(
    ("visible", "device"),
    [("", "cuda:0"), ("2,3", "cuda:2"), ("1,-1,0", "cuda:1"), (None, "cpu"), (None, "cuda:x")],
)
def test_visible_device_selector_rejects(visible: str | None, device: str) -> None:
    with pytest.raises(MeterUnavailable):
        visible_device_selector(device, visible)


def test_cuda_visible_devices_integers(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml.nvmlDeviceGetCount.return_value = 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with NvmlMeter("cuda:1"):
        pass
    nvml.nvmlDeviceGetHandleByIndex.assert_called_once_with(3)
    nvml.nvmlDeviceGetTotalEnergyConsumption.assert_called_with("handle3")


def test_cuda_visible_devices_uuids(nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    with NvmlMeter("cuda:1"):
        pass
    nvml.nvmlDeviceGetHandleByUUID.assert_called_once_with("GPU-bbbb")
    nvml.nvmlDeviceGetHandleByIndex.assert_not_called()
    nvml.nvmlDeviceGetTotalEnergyConsumption.assert_called_with("handle-GPU-bbbb")


def test_explicit_index_overrides_cuda_visible_devices(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    with NvmlMeter("cuda:0", index=1):
        pass
    nvml.nvmlDeviceGetHandleByIndex.assert_called_once_with(1)
    nvml.nvmlDeviceGetHandleByUUID.assert_not_called()


def test_missing_device_is_unavailable_and_releases_nvml(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(MeterUnavailable, match="index 5"):
        NvmlMeter("cuda:5")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-gone")
    nvml.nvmlDeviceGetHandleByUUID.side_effect = pynvml.NVMLError_NotFound()
    with pytest.raises(MeterUnavailable, match="GPU-gone"):
        NvmlMeter("cuda:0")
    nvml.nvmlDeviceGetHandleByUUID.side_effect = pynvml.NVMLError_InvalidArgument()
    with pytest.raises(MeterUnavailable, match="GPU-gone"):
        NvmlMeter("cuda:0")
    assert nvml.nvmlInit.call_count == nvml.nvmlShutdown.call_count == 3


def test_init_is_reference_counted(nvml: FakeNvml) -> None:
    first = NvmlMeter("cuda:0")
    second = NvmlMeter("cuda:1")
    assert nvml.nvmlInit.call_count == 1
    first.close()
    first.close()  # idempotent: must not release the second meter's hold
    nvml.nvmlShutdown.assert_not_called()
    assert nvml_available() is True  # a probe shares the same hold
    nvml.nvmlShutdown.assert_not_called()
    second.close()
    assert nvml.nvmlShutdown.call_count == 1
    third = NvmlMeter("cuda:0")
    assert nvml.nvmlInit.call_count == 2
    third.close()
    assert nvml.nvmlShutdown.call_count == 2


def test_init_failure_is_unavailable_without_shutdown(nvml: FakeNvml) -> None:
    cause = pynvml.NVMLError_DriverNotLoaded()
    nvml.nvmlInit.side_effect = cause
    with pytest.raises(NvmlUnavailable, match="nvmlInit") as info:
        NvmlMeter("cuda:0")
    assert info.value.__cause__ is cause
    nvml.nvmlShutdown.assert_not_called()


def test_no_nvml_call_at_import() -> None:
    code = (
        "import sys, pynvml\n"
        "def refuse(*args): sys.exit('NVML called at import')\n"
        "pynvml.nvmlInit = pynvml.nvmlInitWithFlags = refuse\n"
        "import proxy.energy.meter, proxy.energy.nvml\n"
    )
    repo_root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=repo_root)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        ({}, True),
        ({"nvmlDeviceGetCount": {"return_value": 0}}, False),
        ({"nvmlDeviceGetCount": {"side_effect": pynvml.NVMLError_Unknown()}}, False),
        ({"nvmlInit": {"side_effect": pynvml.NVMLError_LibraryNotFound()}}, False),
    ],
)
def test_nvml_available(nvml: FakeNvml, setup: dict[str, dict[str, Any]], expected: bool) -> None:
    for name, attributes in setup.items():
        for attribute, value in attributes.items():
            setattr(getattr(nvml, name), attribute, value)
    assert nvml_available() is expected
    assert nvml.nvmlShutdown.call_count == nvml.nvmlInit.call_count - (
        1 if "side_effect" in setup.get("nvmlInit", {}) else 0
    )


def test_nvml_available_without_pynvml() -> None:
    with mock.patch.object(nvml_module, "pynvml", None):
        assert nvml_available() is False
        with pytest.raises(MeterUnavailable, match="pynvml"):
            NvmlMeter("cuda:0")


# open_meter -----------------------------------------------------------------------------------


def test_open_meter_auto_picks_nvml_when_it_works(nvml: FakeNvml, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="proxy.energy.meter"):
        meter = open_meter("auto", "cuda:0")
    with meter:
        assert isinstance(meter, NvmlMeter)
        assert meter.measurement == "measured"
    assert any("measured by NVML" in r.getMessage() for r in caplog.records)


def test_open_meter_auto_picks_estimated_when_nvml_fails(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    nvml.nvmlInit.side_effect = pynvml.NVMLError_LibraryNotFound()
    with caplog.at_level(logging.INFO, logger="proxy.energy.meter"):
        meter = open_meter("auto", "cuda:0", estimated={"watts_per_core": 20.0})
    assert isinstance(meter, EstimatedMeter)
    assert (meter.measurement, meter.device, meter.watts_per_core) == ("estimated", "cuda:0", 20.0)
    [record] = [r for r in caplog.records if r.name == "proxy.energy.meter"]
    assert record.levelno == logging.INFO
    assert "estimated" in record.getMessage()
    assert "NVML Shared Library Not Found" in record.getMessage()


def test_open_meter_auto_on_cpu_does_not_touch_nvml(nvml: FakeNvml) -> None:
    meter = open_meter("auto", "cpu")
    assert isinstance(meter, EstimatedMeter)
    nvml.nvmlInit.assert_not_called()


def test_open_meter_nvml_raises_without_nvml(nvml: FakeNvml) -> None:
    nvml.nvmlInit.side_effect = pynvml.NVMLError_DriverNotLoaded()
    with pytest.raises(MeterUnavailable, match=r"cuda:0: nvmlInit failed: Driver Not Loaded"):
        open_meter("nvml", "cuda:0")
    with pytest.raises(MeterUnavailable, match="not a CUDA device"):
        open_meter("nvml", "cpu")


def test_open_meter_passes_nvml_options(nvml: FakeNvml) -> None:
    with open_meter("nvml", "cuda:0", nvml={"index": 1, "step_hint_s": 0.02}) as meter:
        assert meter.step_hint_s == 0.02
    nvml.nvmlDeviceGetHandleByIndex.assert_called_once_with(1)


def test_open_meter_synthetic_and_estimated() -> None:
    clock = MutableClock(5.0)
    synthetic = open_meter("synthetic", "cuda:3", clock=clock, synthetic={"idle_watts": 10.0})
    assert isinstance(synthetic, SyntheticMeter)
    assert (synthetic.device, synthetic.measurement, synthetic.method) == (
        "cuda:3",
        "synthetic",
        "synthetic_profile",
    )
    clock.t_s = 7.0
    assert synthetic.read() == Reading(7.0, 20.0)
    estimated = open_meter("estimated", "cpu", clock=clock)
    assert isinstance(estimated, EstimatedMeter)
    with pytest.raises(ValueError, match="unknown meter kind"):
        open_meter("bogus", "cpu")  # type: ignore[arg-type]


# SyntheticMeter -------------------------------------------------------------------------------


def test_synthetic_idle_and_busy_exact() -> None:
    clock = MutableClock(100.0)
    meter = SyntheticMeter("cuda:0", idle_watts=50.0, busy_watts=300.0, clock=clock)
    assert (meter.continuous, meter.step_hint_s) == (True, 0.0)
    assert meter.power_watts() == 50.0
    clock.t_s = 102.0
    assert meter.read() == Reading(102.0, 100.0)  # 2 s idle
    meter.job_started()
    assert meter.power_watts() == 300.0
    clock.t_s = 103.5
    assert meter.read() == Reading(103.5, 550.0)  # + 1.5 s busy
    clock.t_s = 104.0
    meter.job_finished()
    assert meter.power_watts() == 50.0
    clock.t_s = 108.0
    assert meter.read() == Reading(108.0, 900.0)  # + 0.5 s busy + 4 s idle


def test_synthetic_nested_jobs_count() -> None:
    clock = MutableClock(0.0)
    meter = SyntheticMeter(idle_watts=10.0, busy_watts=110.0, clock=clock)
    meter.job_started()
    clock.t_s = 1.0
    meter.job_started()
    clock.t_s = 2.0
    meter.job_finished()  # one job still running: still busy
    clock.t_s = 3.0
    assert meter.read().energy_j == 330.0
    meter.job_finished()
    clock.t_s = 5.0
    assert meter.read().energy_j == 350.0
    with pytest.raises(RuntimeError):
        meter.job_finished()


def test_synthetic_stepped_reads_return_last_update() -> None:
    clock = MutableClock(0.0)
    meter = SyntheticMeter(idle_watts=100.0, busy_watts=500.0, update_period_s=0.25, clock=clock)
    assert (meter.continuous, meter.step_hint_s) == (False, 0.25)
    clock.t_s = 0.125
    meter.job_started()
    clock.t_s = 0.375  # between updates: energy as of 0.25 s
    assert meter.read() == Reading(0.375, 100.0 * 0.25 + 400.0 * 0.125)
    clock.t_s = 0.4375
    meter.job_finished()
    clock.t_s = 0.4375
    assert meter.read() == Reading(0.4375, 75.0)  # still as of 0.25 s: same value
    clock.t_s = 0.5  # an update instant
    assert meter.read() == Reading(0.5, 100.0 * 0.5 + 400.0 * 0.3125)
    clock.t_s = 0.0625 + 0.5
    assert meter.read().energy_j == 175.0


def test_synthetic_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="idle_watts"):
        SyntheticMeter(idle_watts=-1.0)
    with pytest.raises(ValueError, match="update_period_s"):
        SyntheticMeter(update_period_s=math.nan)


def exact_energy_j(
    t_open_s: float,
    until_s: float,
    busy_intervals: list[tuple[float, float]],
    idle_watts: float,
    busy_watts: float,
) -> float:
    """The integral of the profile over [t_open, until_s], from closed busy intervals."""
    busy_s = sum(max(0.0, min(end, until_s) - start) for start, end in busy_intervals)
    return idle_watts * (until_s - t_open_s) + (busy_watts - idle_watts) * busy_s


events = st.lists(
    st.tuples(
        st.sampled_from(["start", "finish", "read", "read_at_update"]),
        st.floats(min_value=0.0, max_value=0.3, allow_nan=False),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(
    events=events,
    period_s=st.sampled_from([0.0, 0.02, 0.1, 0.07]),
    idle_watts=st.floats(min_value=0.0, max_value=500.0),
    extra_watts=st.floats(min_value=0.0, max_value=1000.0),
    t_open_s=st.floats(min_value=0.0, max_value=1e5),
)
def test_synthetic_stepped_property(
    events: list[tuple[str, float]],
    period_s: float,
    idle_watts: float,
    extra_watts: float,
    t_open_s: float,
) -> None:
    busy_watts = idle_watts + extra_watts
    clock = MutableClock(t_open_s)
    meter = SyntheticMeter(
        idle_watts=idle_watts, busy_watts=busy_watts, update_period_s=period_s, clock=clock
    )
    depth = 0
    busy_since: float | None = None
    intervals: list[tuple[float, float]] = []
    previous_j = 0.0
    for action, dt_s in events:
        if action == "read_at_update" and period_s > 0:
            k = math.floor((clock.t_s - t_open_s) / period_s) + 1
            clock.t_s = t_open_s + k * period_s
        else:
            clock.t_s += dt_s
        if action == "start":
            depth += 1
            if depth == 1:
                busy_since = clock.t_s
            meter.job_started()
        elif action == "finish" and depth > 0:
            depth -= 1
            if depth == 0:
                assert busy_since is not None
                intervals.append((busy_since, clock.t_s))
                busy_since = None
            meter.job_finished()
        elif action.startswith("read"):
            reading = meter.read()
            assert reading.t_s == clock.t_s
            assert reading.energy_j >= previous_j
            previous_j = reading.energy_j
            until_s = meter.last_update_s(clock.t_s)
            assert until_s <= clock.t_s
            if period_s > 0:
                assert clock.t_s - until_s < period_s * (1 + 1e-9) + 1e-9
            if action == "read_at_update" or period_s == 0:
                assert until_s == clock.t_s
            closed = [*intervals, (busy_since, math.inf)] if busy_since is not None else intervals
            expected_j = exact_energy_j(t_open_s, until_s, closed, idle_watts, busy_watts)
            assert reading.energy_j == pytest.approx(expected_j, rel=1e-9, abs=1e-6)


# EstimatedMeter -------------------------------------------------------------------------------


def test_estimated_exact_arithmetic() -> None:
    meter = EstimatedMeter(
        "cpu",
        watts_per_core=12.0,
        idle_watts=5.0,
        clock=fake_clock([10.0, 12.0, 14.0]),
        cpu_clock=fake_clock([3.0, 4.5, 4.75]),
    )
    assert (meter.measurement, meter.method, meter.continuous) == ("estimated", "cpu_time_model", True)
    assert meter.power_watts() is None
    assert meter.read() == Reading(12.0, 5.0 * 2 + 12.0 * 1.5)  # 28 J
    assert meter.power_watts() == 14.0  # 28 J over 2 s since open
    assert meter.read() == Reading(14.0, 5.0 * 4 + 12.0 * 1.75)  # 41 J
    assert meter.power_watts() == 6.5


def test_estimated_with_real_clocks_counts_burnt_cpu() -> None:
    meter = EstimatedMeter()
    start_s = time.process_time()
    total = 0
    while time.process_time() - start_s < 0.02:
        total += sum(range(1000))
    reading = meter.read()
    assert reading.energy_j > 0
    assert meter.measurement == "estimated"
    assert isinstance(meter, meter_module.EnergyMeter)
