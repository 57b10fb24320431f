"""NVML energy meter for NVIDIA GPUs.

Primary source: ``nvmlDeviceGetTotalEnergyConsumption`` (Volta and newer), millijoules since the
driver was loaded. It moves in steps of roughly 20-100 ms, so a window shorter than a step can
read 0 J. Fallback where the counter is unsupported: the trapezoid integral of
``nvmlDeviceGetPowerUsage`` (mW) between reads; on Ampere and newer that power is a 1 s average, so
the fallback is coarse. The sensor's gain error is about +-5%.

``nvmlInit`` is process-wide and reference-counted: the first meter opened initializes NVML and the
last one closed shuts it down. No NVML call happens at import.

Units: mJ and mW from NVML, J, W and s in this module's API.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

from proxy.energy.meter import EnergyMeter, Measurement, MeterError, MeterUnavailable, Reading

try:
    import pynvml
except ImportError:  # pragma: no cover - nvidia-ml-py is a declared dependency
    pynvml = None

__all__ = [
    "NvmlError",
    "NvmlMeter",
    "NvmlNotSupported",
    "NvmlUnavailable",
    "nvml_available",
    "visible_device_selector",
]

logger = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


class NvmlError(MeterError):
    """An NVML call failed; raised ``from`` the original ``pynvml.NVMLError``."""


class NvmlNotSupported(NvmlError):
    """The device or driver does not support the NVML function."""


class NvmlUnavailable(NvmlError, MeterUnavailable):
    """NVML or the device cannot be reached (no library, no driver, no such GPU, GPU lost)."""


# NVMLError subclass names (pynvml generates them) mapped to this module's error types.
_ERROR_TYPES: dict[str, type[NvmlError]] = {
    "NVMLError_NotSupported": NvmlNotSupported,
    "NVMLError_FunctionNotFound": NvmlNotSupported,
    "NVMLError_LibraryNotFound": NvmlUnavailable,
    "NVMLError_DriverNotLoaded": NvmlUnavailable,
    "NVMLError_LibRmVersionMismatch": NvmlUnavailable,
    "NVMLError_NoPermission": NvmlUnavailable,
    "NVMLError_NotFound": NvmlUnavailable,
    "NVMLError_GpuIsLost": NvmlUnavailable,
    "NVMLError_Uninitialized": NvmlUnavailable,
}


def _map_nvml_error(error: Exception, where: str) -> NvmlError:
    """The typed error for a ``pynvml.NVMLError`` raised in ``where``."""
    error_type = _ERROR_TYPES.get(type(error).__name__, NvmlError)
    return error_type(f"{where} failed: {error}")


def _nvml_errors(
    function: str,
) -> Callable[[Callable[Concatenate[NvmlMeter, P], R]], Callable[Concatenate[NvmlMeter, P], R]]:
    """Decorate an :class:`NvmlMeter` method that calls NVML ``function``: map NVMLError to NvmlError."""

    def decorate(
        method: Callable[Concatenate[NvmlMeter, P], R],
    ) -> Callable[Concatenate[NvmlMeter, P], R]:
        @functools.wraps(method)
        def wrapper(self: NvmlMeter, *args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(self, *args, **kwargs)
            except pynvml.NVMLError as e:
                raise _map_nvml_error(e, f"{self.device}: {function}") from e

        return wrapper

    return decorate


# The only process-wide state: how many open meters (and probes) hold nvmlInit.
_init_lock = threading.Lock()
_init_count = 0


def _nvml_acquire() -> None:
    """``nvmlInit`` on first use in the process; raises ``pynvml.NVMLError``."""
    global _init_count
    with _init_lock:
        if _init_count == 0:
            pynvml.nvmlInit()
        _init_count += 1


def _nvml_release() -> None:
    """``nvmlShutdown`` when the last holder releases; never raises."""
    global _init_count
    with _init_lock:
        if _init_count == 0:
            return
        _init_count -= 1
        if _init_count == 0:
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError as e:
                logger.warning("nvmlShutdown failed: %s", e)


def nvml_available() -> bool:
    """True when pynvml imports, ``nvmlInit`` succeeds and at least one GPU is present."""
    if pynvml is None:
        return False
    try:
        _nvml_acquire()
    except pynvml.NVMLError as e:
        logger.debug("NVML unavailable: nvmlInit failed: %s", e)
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    except pynvml.NVMLError as e:
        logger.debug("NVML unavailable: nvmlDeviceGetCount failed: %s", e)
        return False
    finally:
        _nvml_release()


_CUDA_DEVICE = re.compile(r"cuda(?::(\d+))?")
# More than any board draws (a B200 is rated 1,000 W): a counter that restarted from zero since the last
# read cannot show more than this times the time between them
MAX_BOARD_WATTS = 2_000.0


def visible_device_selector(device: str, cuda_visible_devices: str | None) -> int | str:
    """The NVML index (int) or UUID (str) of the CUDA device ``device`` (``"cuda"``, ``"cuda:N"``).

    NVML ignores ``CUDA_VISIBLE_DEVICES``; CUDA numbers only the devices it lists. With integers,
    ``cuda:N`` is the N-th listed index; with UUIDs (``GPU-...``, ``MIG-...``), the N-th UUID. Like
    CUDA, the list ends at the first empty or negative entry. Unset: ``cuda:N`` is NVML index N
    (this assumes ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` on hosts with mixed GPU models).
    Raises MeterUnavailable when ``device`` is not a CUDA device or is not visible.
    """
    match = _CUDA_DEVICE.fullmatch(device.strip())
    if match is None:
        raise MeterUnavailable(f"{device!r} is not a CUDA device (expected 'cuda' or 'cuda:N')")
    ordinal = int(match.group(1) or 0)
    if cuda_visible_devices is None:
        return ordinal
    visible: list[int | str] = []
    for entry in (part.strip() for part in cuda_visible_devices.split(",")):
        if not entry:
            break
        try:
            index = int(entry)
        except ValueError:
            visible.append(entry)
            continue
        if index < 0:
            break
        visible.append(index)
    if ordinal >= len(visible):
        raise MeterUnavailable(
            f"{device} is not visible: CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} lists "
            f"{len(visible)} device(s)"
        )
    return visible[ordinal]


class NvmlMeter(EnergyMeter):
    """Energy of one NVIDIA GPU from NVML, labelled ``"measured"``.

    ``read()`` returns ``(clock(), (raw_mJ - base_mJ + carried_mJ) / 1000)``, where ``base_mJ``
    is the counter at open. If the counter goes backwards (driver reload, GPU reset), the energy so
    far is carried and the new raw value counts as energy since the reset: energy between the last
    read and the reset is unknowable and is not invented; the total never decreases.

    Where the counter is unsupported (pre-Volta, or ``NotSupported`` at open), the meter integrates
    ``nvmlDeviceGetPowerUsage`` with the trapezoid rule between reads instead
    (``method = "nvml_power_integration"``, continuous).

    ``cuda:N`` is mapped to an NVML device through ``CUDA_VISIBLE_DEVICES``; an explicit ``index``
    (NVML's numbering) overrides it. ``step_hint_s`` is the counter's expected update period, s.
    Reads are guarded by a lock, so concurrent calls are safe; NVML calls may block briefly, so
    call from a worker thread, never an event loop.
    """

    measurement: Measurement = "measured"
    blocking_reads = True  # 3-4.6 ms a read on an H200 VM (bench/results/nvml_interference.md)

    def __init__(
        self,
        device: str = "cuda:0",
        *,
        index: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        step_hint_s: float = 0.1,
    ) -> None:
        if pynvml is None:
            raise MeterUnavailable("NVML is unavailable: the pynvml module (nvidia-ml-py) is not installed")
        if not step_hint_s >= 0:
            raise ValueError(f"step_hint_s must be >= 0, got {step_hint_s!r}")
        if index is not None and index < 0:
            raise ValueError(f"index must be >= 0, got {index!r}")
        self.device = device
        self.method = "nvml_energy_counter"
        self.continuous = False
        self.step_hint_s = float(step_hint_s)
        self._clock = clock
        self._lock = threading.Lock()
        self._closed = True
        selector = (
            index
            if index is not None
            else visible_device_selector(device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        )
        self._init()
        self._closed = False
        try:
            self._handle = self._open_handle(selector)
            self._open_source()
        except BaseException:
            self.close()
            raise

    # NVML calls, each mapped to typed errors by the decorator.

    @_nvml_errors("nvmlInit")
    def _init(self) -> None:
        _nvml_acquire()

    @_nvml_errors("nvmlDeviceGetCount")
    def _device_count(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    @_nvml_errors("nvmlDeviceGetHandleByIndex")
    def _handle_by_index(self, index: int) -> Any:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    @_nvml_errors("nvmlDeviceGetHandleByUUID")
    def _handle_by_uuid(self, uuid: str) -> Any:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid)

    @_nvml_errors("nvmlDeviceGetArchitecture")
    def _architecture(self) -> int:
        return int(pynvml.nvmlDeviceGetArchitecture(self._handle))

    @_nvml_errors("nvmlDeviceGetTotalEnergyConsumption")
    def _total_energy_mj(self) -> int:
        """The driver's energy counter, mJ since driver load."""
        return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))

    @_nvml_errors("nvmlDeviceGetPowerUsage")
    def _power_mw(self) -> int:
        """Board power, mW (a 1 s average on Ampere and newer)."""
        return int(pynvml.nvmlDeviceGetPowerUsage(self._handle))

    def _open_handle(self, selector: int | str) -> Any:
        if isinstance(selector, str):
            try:
                return self._handle_by_uuid(selector)
            except NvmlError as e:
                raise NvmlUnavailable(f"{self.device}: NVML finds no GPU with UUID {selector}: {e}") from e
        count = self._device_count()
        if selector >= count:
            raise NvmlUnavailable(f"{self.device}: NVML index {selector} missing; NVML sees {count} GPU(s)")
        return self._handle_by_index(selector)

    def _counter_supported_by_architecture(self) -> bool:
        try:
            architecture = self._architecture()
        except NvmlError:
            return True  # unknown: let the counter itself answer
        return not architecture < pynvml.NVML_DEVICE_ARCH_VOLTA

    def _open_source(self) -> None:
        """Take the opening sample from the energy counter, or fall back to power integration."""
        self._carried_mj = 0
        self._energy_j = 0.0
        if self._counter_supported_by_architecture():
            try:
                self._base_mj = self._last_raw_mj = self._total_energy_mj()
            except NvmlNotSupported:
                reason = "nvmlDeviceGetTotalEnergyConsumption is not supported"
            else:
                self._last_t_s = self._clock()
                return
        else:
            reason = "the GPU predates Volta, which has no energy counter"
        try:
            self._last_power_mw = self._power_mw()
        except NvmlNotSupported as e:
            raise NvmlUnavailable(
                f"{self.device}: NVML supports neither the energy counter nor power usage"
            ) from e
        self._last_t_s = self._clock()
        self.method = "nvml_power_integration"
        self.continuous = True
        self.step_hint_s = 0.0
        logger.warning(
            "%s: %s; integrating nvmlDeviceGetPowerUsage instead (a coarse fallback: power is a "
            "1 s average on Ampere and newer)",
            self.device,
            reason,
        )

    def read(self) -> Reading:
        """Clock now and the joules since open. Raises NvmlError (with the NVML cause)."""
        with self._lock:
            if self._closed:
                raise MeterError(f"{self.device}: the NVML meter is closed")
            if self.method == "nvml_power_integration":
                return self._read_power_integral()
            return self._read_counter()

    def _read_counter(self) -> Reading:
        raw_mj = self._total_energy_mj()
        t_s = self._clock()
        if raw_mj < self._last_raw_mj and raw_mj > max(t_s - self._last_t_s, 0.0) * MAX_BOARD_WATTS * 1000:
            # Back, but by less than a restart from zero since the last read could explain (more than
            # any board draws in that time): a glitch, not a reset. Nothing is added until the counter
            # passes its last value again (taking it as a restart would add its whole total).
            logger.warning(
                "%s: NVML energy counter stepped back (%d mJ -> %d mJ) without a reset; ignored",
                self.device,
                self._last_raw_mj,
                raw_mj,
            )
            self._last_t_s = t_s
            return Reading(t_s, (self._carried_mj + self._last_raw_mj - self._base_mj) / 1000.0)
        if raw_mj < self._last_raw_mj:
            logger.warning(
                "%s: NVML energy counter went backwards (%d mJ -> %d mJ), likely a driver reload or "
                "GPU reset; energy since the previous read up to the reset is lost",
                self.device,
                self._last_raw_mj,
                raw_mj,
            )
            self._carried_mj += self._last_raw_mj - self._base_mj
            self._base_mj = 0
        self._last_raw_mj = raw_mj
        self._last_t_s = t_s
        return Reading(t_s, (self._carried_mj + raw_mj - self._base_mj) / 1000.0)  # t_s, energy_j

    def _read_power_integral(self) -> Reading:
        power_mw = self._power_mw()
        t_s = self._clock()
        elapsed_s = max(0.0, t_s - self._last_t_s)
        self._energy_j += (self._last_power_mw + power_mw) / 2.0 * elapsed_s / 1000.0
        self._last_power_mw = power_mw
        self._last_t_s = max(self._last_t_s, t_s)
        return Reading(t_s=t_s, energy_j=self._energy_j)

    def power_watts(self) -> float | None:
        """Board power from ``nvmlDeviceGetPowerUsage``, W (a 1 s average on Ampere+); None on error."""
        if self._closed:
            return None
        try:
            return self._power_mw() / 1000.0
        except NvmlError as e:
            logger.debug("%s", e)
            return None

    def close(self) -> None:
        """Release this meter's hold on NVML (``nvmlShutdown`` after the last one). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        _nvml_release()
