"""Energy meters: the device layer below attribution.

A meter exposes one cumulative energy figure per device. ``read()`` returns a :class:`Reading`
whose ``energy_j`` counts joules since the meter was opened and never decreases; attribution works
only on differences between readings. Three kinds exist, each labelled honestly:

- ``measured``: NVML's energy counter on the GPU (:mod:`proxy.energy.nvml`).
- ``estimated``: a CPU-time model, used where no GPU is visible (:class:`EstimatedMeter`).
- ``synthetic``: a deterministic power profile for tests and demos (:class:`SyntheticMeter`).

Units: J, W, s. Every meter here guards its state with its own lock, so ``read()`` and the job
hooks may be called from several threads; callers that need a consistent pair of readings across
a job still serialize them themselves.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "EnergyMeter",
    "EstimatedMeter",
    "Measurement",
    "MeterError",
    "MeterKind",
    "MeterUnavailable",
    "Reading",
    "SyntheticMeter",
    "nvml_available",
    "open_meter",
]

logger = logging.getLogger(__name__)

Measurement = Literal["measured", "estimated", "synthetic"]
MeterKind = Literal["auto", "nvml", "estimated", "synthetic"]
Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Reading:
    """One meter reading.

    ``t_s``: the meter's clock (``time.monotonic`` by default), seconds.
    ``energy_j``: cumulative joules since the meter was opened; never decreases between reads.
    """

    t_s: float
    energy_j: float


class MeterError(Exception):
    """Base of all meter errors."""


class MeterUnavailable(MeterError):
    """The requested meter cannot be opened here (no NVML, no GPU, device index missing...)."""


class EnergyMeter(abc.ABC):
    """Cumulative energy of one device.

    Attributes:
        device: the device the meter covers, e.g. ``"cuda:0"`` or ``"cpu"``.
        measurement: ``"measured"``, ``"estimated"`` or ``"synthetic"``; never present an
            estimate as a measurement.
        method: how the figure is obtained: ``"nvml_energy_counter"``, ``"nvml_power_integration"``,
            ``"cpu_time_model"`` or ``"synthetic_profile"``.
        continuous: True when each ``read()`` reflects energy up to that very instant; False when
            the underlying counter moves in steps (a short window can read 0 J).
        step_hint_s: expected update period of the underlying counter, s (0.0 when continuous).
        blocking_reads: True when a read can block for milliseconds (NVML): no job boundary reads
            it, on an event loop or a device thread; the sampler thread does (see
            `DeviceMonitor.begin`).
    """

    device: str
    measurement: Measurement
    method: str
    continuous: bool
    step_hint_s: float
    blocking_reads: bool = False

    @abc.abstractmethod
    def read(self) -> Reading:
        """Return the meter's clock and the joules since the meter was opened."""

    def power_watts(self) -> float | None:
        """A power figure for gauges, W, or None if unknown. Never used for energy totals."""
        return None

    def job_started(self) -> None:  # noqa: B027 (an optional hook, a no-op by default)
        """Called by the device worker just before a job runs on the device."""

    def job_finished(self) -> None:  # noqa: B027 (an optional hook, a no-op by default)
        """Called by the device worker just after a job on the device has finished."""

    def close(self) -> None:  # noqa: B027 (an optional hook, a no-op by default)
        """Release the meter's resources. Idempotent."""

    def __enter__(self) -> EnergyMeter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(device={self.device!r}, measurement={self.measurement!r}, "
            f"method={self.method!r})"
        )


def _check_non_negative(name: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class SyntheticMeter(EnergyMeter):
    """A deterministic power profile: ``idle_watts`` when no job runs, ``busy_watts`` while one does.

    ``energy(t) = idle_watts * (t - t_open) + (busy_watts - idle_watts) * busy_seconds(t)``, where
    the device is busy while more jobs have started than finished (nesting counts).

    With ``update_period_s > 0`` it emulates NVML's stepped counter: a read at time ``t`` returns
    ``t_s = t`` but the energy as of the last update instant ``t_open + k * update_period_s <= t``,
    computed exactly from the busy transitions recorded since the previous read.

    Units: W, s, J.
    """

    measurement: Measurement = "synthetic"
    method = "synthetic_profile"

    def __init__(
        self,
        device: str = "cpu",
        *,
        idle_watts: float = 50.0,
        busy_watts: float = 300.0,
        update_period_s: float = 0.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self.device = device
        self.idle_watts = _check_non_negative("idle_watts", idle_watts)
        self.busy_watts = _check_non_negative("busy_watts", busy_watts)
        self.update_period_s = _check_non_negative("update_period_s", update_period_s)
        self.continuous = self.update_period_s == 0.0
        self.step_hint_s = self.update_period_s
        self._clock = clock
        self._lock = threading.Lock()
        self._t_open_s = clock()
        self._active_jobs = 0
        # Busy seconds are folded into an anchor at each read; transitions after the anchor stay
        # in the queue because a stepped read may report an instant before them (a continuous
        # meter folds each transition in as it happens: the queue stays empty).
        self._anchor_t_s = self._t_open_s
        self._anchor_busy_s = 0.0
        self._anchor_is_busy = False
        self._transitions: deque[tuple[float, bool]] = deque()
        self._last_energy_j = 0.0

    def _record_transition(self, is_busy: bool) -> None:
        t_s = self._clock()
        if self.continuous:  # every read reports its own instant, so fold the transition in at once
            if t_s < self._anchor_t_s:
                t_s = self._anchor_t_s
            if self._anchor_is_busy:
                self._anchor_busy_s += t_s - self._anchor_t_s
            self._anchor_t_s, self._anchor_is_busy = t_s, is_busy
            return
        floor_s = self._transitions[-1][0] if self._transitions else self._anchor_t_s
        self._transitions.append((max(t_s, floor_s), is_busy))

    def job_started(self) -> None:
        """Mark the device busy (nesting counts). Units: none."""
        with self._lock:
            self._active_jobs += 1
            if self._active_jobs == 1:
                self._record_transition(True)

    def job_finished(self) -> None:
        """Mark the end of a job; the device is idle again once every started job has finished."""
        with self._lock:
            if self._active_jobs == 0:
                raise RuntimeError("job_finished() called without a matching job_started()")
            self._active_jobs -= 1
            if self._active_jobs == 0:
                self._record_transition(False)

    def last_update_s(self, t_s: float) -> float:
        """The last counter update instant at or before ``t_s``, s (``t_s`` itself when continuous)."""
        if self.continuous:
            return t_s
        period_s = self.update_period_s
        elapsed_s = t_s - self._t_open_s
        k = math.floor(elapsed_s / period_s) if elapsed_s > 0 else 0
        # The division can round either way; settle k against the same expression that defines
        # the instants, so that a read exactly at an update instant sees that update.
        if self._t_open_s + (k + 1) * period_s <= t_s:
            k += 1
        elif k > 0 and self._t_open_s + k * period_s > t_s:
            k -= 1
        return min(self._t_open_s + k * period_s, t_s)

    def _busy_seconds_until(self, until_s: float) -> float:
        """Busy seconds in [t_open, until_s]; folds the transitions up to ``until_s`` into the anchor."""
        until_s = max(until_s, self._anchor_t_s)
        busy_s = self._anchor_busy_s
        prev_s = self._anchor_t_s
        is_busy = self._anchor_is_busy
        while self._transitions and self._transitions[0][0] <= until_s:
            t_s, becomes_busy = self._transitions.popleft()
            if is_busy:
                busy_s += t_s - prev_s
            prev_s, is_busy = t_s, becomes_busy
        if is_busy:
            busy_s += until_s - prev_s
        self._anchor_t_s, self._anchor_busy_s, self._anchor_is_busy = until_s, busy_s, is_busy
        return busy_s

    def read(self) -> Reading:
        """Clock now and the profile's joules since open (as of the last update when stepped)."""
        with self._lock:
            t_s = self._clock()
            if self.continuous:  # `_busy_seconds_until(t_s)` with no transition left to fold
                until_s = t_s if t_s > self._anchor_t_s else self._anchor_t_s
                busy_s = self._anchor_busy_s
                if self._anchor_is_busy:
                    busy_s += until_s - self._anchor_t_s
                self._anchor_t_s, self._anchor_busy_s = until_s, busy_s
            else:
                until_s = max(self.last_update_s(t_s), self._anchor_t_s)
                busy_s = self._busy_seconds_until(until_s)
            energy_j = (
                self.idle_watts * (until_s - self._t_open_s) + (self.busy_watts - self.idle_watts) * busy_s
            )
            # Only reachable through rounding when busy_watts < idle_watts.
            energy_j = max(energy_j, self._last_energy_j)
            self._last_energy_j = energy_j
            return Reading(t_s, energy_j)  # positional: a hot call

    def power_watts(self) -> float:
        """The profile's current power, W."""
        with self._lock:
            return self.busy_watts if self._active_jobs > 0 else self.idle_watts


class EstimatedMeter(EnergyMeter):
    """A CPU-time model for hosts where no GPU is visible.

    ``energy = idle_watts * (t - t_open) + watts_per_core * (cpu_s - cpu_s_at_open)``, where
    ``cpu_s`` is the CPU time of the whole serving process (all threads; ``time.process_time``).
    An estimate, labelled ``"estimated"``. Units: W, s, J.
    """

    measurement: Measurement = "estimated"
    method = "cpu_time_model"
    continuous = True
    step_hint_s = 0.0

    def __init__(
        self,
        device: str = "cpu",
        *,
        watts_per_core: float = 10.0,
        idle_watts: float = 0.0,
        clock: Clock = time.monotonic,
        cpu_clock: Clock = time.process_time,
    ) -> None:
        self.device = device
        self.watts_per_core = _check_non_negative("watts_per_core", watts_per_core)
        self.idle_watts = _check_non_negative("idle_watts", idle_watts)
        self._clock = clock
        self._cpu_clock = cpu_clock
        self._lock = threading.Lock()
        self._t_open_s = clock()
        self._cpu_open_s = cpu_clock()
        self._last: Reading = Reading(t_s=self._t_open_s, energy_j=0.0)
        self._previous: Reading | None = None

    def read(self) -> Reading:
        """Clock now and the modelled joules since open."""
        with self._lock:
            t_s = self._clock()
            cpu_s = self._cpu_clock()
            energy_j = self.idle_watts * (t_s - self._t_open_s) + self.watts_per_core * (
                cpu_s - self._cpu_open_s
            )
            reading = Reading(t_s, max(energy_j, self._last.energy_j))  # positional: a hot call
            self._previous, self._last = self._last, reading
            return reading

    def power_watts(self) -> float | None:
        """Average power between the last two reads, W; None before two reads exist."""
        with self._lock:
            previous, last = self._previous, self._last
        if previous is None or last.t_s <= previous.t_s:
            return None
        return (last.energy_j - previous.energy_j) / (last.t_s - previous.t_s)


def nvml_available() -> bool:
    """True when pynvml imports, ``nvmlInit`` succeeds and at least one GPU is present."""
    from proxy.energy import nvml

    return nvml.nvml_available()


def open_meter(
    kind: MeterKind,
    device: str,
    *,
    clock: Clock = time.monotonic,
    synthetic: dict[str, Any] | None = None,
    estimated: dict[str, Any] | None = None,
    nvml: dict[str, Any] | None = None,
) -> EnergyMeter:
    """Open the meter of ``kind`` for ``device``.

    ``synthetic``, ``estimated`` and ``nvml`` are keyword arguments for the matching meter class.
    ``"auto"`` opens an NVML meter when ``device`` is a CUDA device that NVML finds, and an
    :class:`EstimatedMeter` otherwise, logging which one and why. ``"nvml"`` raises
    :class:`MeterUnavailable` where NVML cannot measure ``device``.
    """
    if kind == "synthetic":
        return SyntheticMeter(device, clock=clock, **(synthetic or {}))
    if kind == "estimated":
        return EstimatedMeter(device, clock=clock, **(estimated or {}))
    if kind not in ("nvml", "auto"):
        raise ValueError(f"unknown meter kind {kind!r}; expected auto, nvml, estimated or synthetic")

    from proxy.energy.nvml import NvmlMeter

    if kind == "nvml":
        return NvmlMeter(device, clock=clock, **(nvml or {}))

    if not device.startswith("cuda"):
        reason = f"{device!r} is not a CUDA device"
    else:
        try:
            meter = NvmlMeter(device, clock=clock, **(nvml or {}))
        except MeterUnavailable as e:
            reason = f"NVML cannot measure it ({e})"
        except MeterError as e:
            logger.warning("energy meter for %s: NVML failed unexpectedly: %s", device, e)
            reason = f"NVML failed ({e})"
        else:
            logger.info("energy meter for %s: measured by NVML (%s)", device, meter.method)
            return meter
    logger.info(
        "energy meter for %s: estimated from CPU time because %s; figures are labelled 'estimated'",
        device,
        reason,
    )
    return EstimatedMeter(device, clock=clock, **(estimated or {}))
