"""Carbon accounting: grid intensity providers, PUE and the embodied hardware share.

For one request (units in brackets)::

    operational [gCO2e] = energy [kWh] x intensity [gCO2e/kWh, in force at the job's time] x PUE [-]
    embodied    [gCO2e] = GPU-seconds [s] x (device + server share) [kgCO2e] x 1000 / lifetime [s]
    co2_grams           = operational + embodied          (embodied is 0 unless enabled)

PUE multiplies the operational part only: it scales the facility's electricity, not the hardware.

Intensity providers (``[carbon] provider``):

- ``static``: the shipped table ``proxy/data/carbon_intensity.csv`` of annual averages per ISO
  country code plus ``WORLD``, each row with its source and data year (OWID/Ember, CC BY 4.0;
  CodeCarbon's IEA world average, MIT).
- ``fixed``: one value from the configuration (``fixed_g_per_kwh``).
- ``csv``: a time series of (timestamp, gCO2e/kWh), hourly or marginal; the row in force at a job's
  time is the last row whose timestamp is <= that time.
- ``electricitymaps`` / ``watttime``: live APIs, fetched in the background and cached; the hot path
  never does I/O. When they fail, the static value of the zone's country (or ``WORLD``) is used
  with source ``fallback-static``.

Embodied defaults (EcoLogits' LLM-inference constants, genai-impact/ecologits): an NVIDIA H100 at
164 kgCO2e to manufacture (newer EcoLogits constants use 273 kgCO2e; set
``embodied_device_kgco2e`` to follow), plus its share of the server around it: EcoLogits counts
5,700 kgCO2e for an 8-GPU server without its GPUs, so 712.5 kgCO2e per GPU, over a 3-year life.
Years are 365 days. These are estimates of manufacturing impact, not measurements.
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import io
import itertools
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Protocol

import aiohttp
from pydantic import BaseModel, ConfigDict, SecretStr

logger = logging.getLogger(__name__)

JOULES_PER_KWH = 3.6e6
SECONDS_PER_YEAR = 365 * 24 * 3600
# 1 lb = 453.59237 g (exact), 1 MWh = 1000 kWh: x lb/MWh = x * 0.45359237 g/kWh.
G_PER_KWH_PER_LB_PER_MWH = 0.45359237

ELECTRICITYMAPS_URL = "https://api.electricitymaps.com"
WATTTIME_URL = "https://api.watttime.org"
# WattTime's login token is valid for 30 minutes; renew it a little before.
WATTTIME_TOKEN_RENEW_S = 25 * 60

STATIC_SOURCE_PREFIX = "static:"
FALLBACK_SOURCE = "fallback-static"
WORLD = "WORLD"


class CarbonConfigError(ValueError):
    """A carbon setting is wrong; the message names the setting and how to fix it."""


class CarbonSettings(BaseModel):
    """The ``[carbon]`` TOML table. Values are checked by `build_carbon`, which raises
    `CarbonConfigError` naming the setting, so the server fails at start, not on a request.

    Units: ``pue`` dimensionless (>= 1.0: total facility energy / IT energy), ``*_g_per_kwh`` in
    gCO2e/kWh, ``*_s`` in seconds, ``*_kgco2e`` in kgCO2e, ``lifetime_years`` in 365-day years.
    """

    model_config = ConfigDict(extra="forbid")

    provider: Literal["static", "fixed", "csv", "electricitymaps", "watttime"] = "static"
    # static: ISO 3166-1 alpha-2 code or WORLD. electricitymaps: its zone id ("DE", "US-CAL-CISO").
    # watttime: its region ("CAISO_NORTH"). fixed/csv: only a label for reports and metrics.
    zone: str = WORLD
    pue: float = 1.0
    fixed_g_per_kwh: float | None = None
    csv_path: Path | None = None
    # Largest allowed step between CSV rows, and how far past the last row a lookup may go before
    # it is logged. None: twice the median step of the file.
    csv_max_gap_s: float | None = None
    api_url: str | None = None  # base URL override (self-hosted proxy, tests)
    api_token: SecretStr | None = None  # Electricity Maps auth-token
    username: str | None = None  # WattTime
    password: SecretStr | None = None  # WattTime
    # Static zone used when a live provider fails. None: the zone's country prefix ("US-CAL-CISO"
    # -> "US") when the table has it, else WORLD.
    fallback_zone: str | None = None
    timeout_s: float = 5.0  # bound on one whole fetch (WattTime: login + data)
    cache_s: float = 300.0  # live value refreshed in the background this often
    # A live value older than this (failures meanwhile) gives way to the fallback.
    # None: max(3 x cache_s, 3600).
    max_age_s: float | None = None
    embodied: bool = False
    embodied_device_kgco2e: float = 164.0
    embodied_server_share_kgco2e: float = 712.5
    lifetime_years: float = 3.0


@dataclass(frozen=True)
class Intensity:
    """A grid carbon intensity in gCO2e/kWh, where it applies, where it came from, and the time
    it refers to (UTC) when the source says so (None for annual averages)."""

    g_per_kwh: float
    zone: str
    source: str
    at: datetime | None


@dataclass(slots=True)  # not frozen: built per request, and a frozen __init__ is twice as slow
class CarbonCharge:
    """The carbon charged for one request, in grams of CO2e.

    Invariant: ``co2_grams == operational_co2_grams + embodied_co2_grams``, and
    ``operational_co2_grams == kWh * intensity_g_per_kwh * pue``."""

    co2_grams: float
    operational_co2_grams: float
    embodied_co2_grams: float
    intensity_g_per_kwh: float
    pue: float
    zone: str
    source: str


class IntensityProvider(Protocol):
    """Where intensities come from. `intensity_at` is on the hot path: synchronous, no I/O."""

    def intensity_at(self, when: datetime) -> Intensity: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def kwh_from_joules(j: float) -> float:
    """Energy in kWh from joules (1 kWh = 3.6e6 J)."""
    return j / JOULES_PER_KWH


def embodied_g_per_gpu_second(settings: CarbonSettings) -> float:
    """Embodied share in gCO2e per GPU-second: (device + server share) kgCO2e spread evenly over
    the hardware's lifetime (365-day years)."""
    total_kg = settings.embodied_device_kgco2e + settings.embodied_server_share_kgco2e
    return total_kg * 1000.0 / (settings.lifetime_years * SECONDS_PER_YEAR)


def _as_utc(when: datetime) -> datetime:
    """Aware datetimes are converted to UTC; naive ones are taken to be UTC already."""
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc)


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_timestamp(text: str) -> datetime:
    """ISO 8601 to an aware UTC datetime. A trailing ``Z`` means UTC; no offset means UTC."""
    text = text.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    return _as_utc(datetime.fromisoformat(text))


def _finite_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


# ---------------------------------------------------------------------------------------------
# Static table
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StaticEntry:
    """One row of the shipped table: annual gCO2e/kWh with its source key and data year."""

    zone: str
    g_per_kwh: float
    source: str
    year: int

    def intensity(self) -> Intensity:
        """This row as an Intensity with source ``static:<source> <year>``."""
        return Intensity(self.g_per_kwh, self.zone, f"{STATIC_SOURCE_PREFIX}{self.source} {self.year}", None)


def load_static_table() -> dict[str, StaticEntry]:
    """The shipped table ``proxy/data/carbon_intensity.csv`` keyed by upper-case zone."""
    text = (resources.files("proxy") / "data" / "carbon_intensity.csv").read_text(encoding="utf-8")
    rows = csv.DictReader(line for line in io.StringIO(text) if not line.startswith("#"))
    table: dict[str, StaticEntry] = {}
    for row in rows:
        entry = StaticEntry(
            row["zone"].strip().upper(), float(row["g_per_kwh"]), row["source"].strip(), int(row["year"])
        )
        if entry.zone in table or not (0.0 <= entry.g_per_kwh < 2000.0):
            raise ValueError(f"shipped carbon table: bad or repeated row for {entry.zone}")
        table[entry.zone] = entry
    if WORLD not in table:
        raise ValueError("shipped carbon table has no WORLD row")
    return table


def _unknown_zone(zone: str, table: Mapping[str, StaticEntry], setting: str) -> CarbonConfigError:
    examples = ", ".join(z for z in ("DE", "FR", "US", "GB", "IN", "JP", WORLD) if z in table)
    return CarbonConfigError(
        f"[carbon] {setting} = {zone!r} is not in the shipped intensity table; use an ISO 3166-1 "
        f'alpha-2 code it has ({len(table)} zones, e.g. {examples}), or set provider = "fixed" '
        "with fixed_g_per_kwh, or a CSV series"
    )


class ConstantIntensityProvider:
    """The same intensity at every time: the ``static`` and ``fixed`` providers."""

    def __init__(self, intensity: Intensity) -> None:
        self._intensity = intensity

    def intensity_at(self, when: datetime) -> Intensity:
        return self._intensity

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# CSV time series
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IntensitySeries:
    """A validated step series: ``values[i]`` (gCO2e/kWh) is in force from ``times[i]`` (UTC epoch
    seconds, strictly increasing, no step larger than ``max_gap_s``) until ``times[i + 1]``."""

    times: tuple[float, ...]
    values: tuple[float, ...]
    max_gap_s: float


def load_intensity_csv(path: Path, max_gap_s: float | None = None) -> IntensitySeries:
    """Read and validate a CSV of ``timestamp,g_per_kwh`` rows.

    Timestamps are ISO 8601; without an offset they are UTC. An optional header row, blank lines
    and ``#`` comments are skipped; further columns are ignored. Raises CarbonConfigError for an
    unreadable or empty file, a bad row, timestamps that do not strictly increase, or a step
    larger than ``max_gap_s`` (default: twice the median step).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CarbonConfigError(
            f"[carbon] csv_path = {str(path)!r} cannot be read ({e}); point it at a readable UTF-8 CSV "
            "of timestamp,g_per_kwh rows"
        ) from e
    times: list[float] = []
    values: list[float] = []
    lines: list[int] = []
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        where = f"[carbon] csv_path {str(path)!r} line {lineno}"
        if len(row) < 2:
            raise CarbonConfigError(f"{where}: expected timestamp,g_per_kwh, got {row!r}")
        try:
            value = float(row[1])
        except ValueError:
            if not times:  # a header row
                continue
            raise CarbonConfigError(f"{where}: {row[1]!r} is not a number of gCO2e/kWh") from None
        try:
            stamp = parse_timestamp(row[0]).timestamp()
        except ValueError:
            raise CarbonConfigError(f"{where}: {row[0]!r} is not an ISO 8601 timestamp") from None
        if not math.isfinite(value) or value < 0:
            raise CarbonConfigError(f"{where}: intensity must be a finite number >= 0, got {row[1]!r}")
        if times and stamp <= times[-1]:
            raise CarbonConfigError(
                f"{where}: timestamp {row[0].strip()!r} does not come after line {lines[-1]}; "
                "rows must be in strictly increasing time order with no repeats"
            )
        times.append(stamp)
        values.append(value)
        lines.append(lineno)
    if not times:
        raise CarbonConfigError(f"[carbon] csv_path {str(path)!r} has no timestamp,g_per_kwh rows")
    steps = [b - a for a, b in itertools.pairwise(times)]
    if max_gap_s is None:
        max_gap_s = 2.0 * statistics.median(steps) if steps else math.inf
    for i, step in enumerate(steps):
        if step > max_gap_s:
            start = datetime.fromtimestamp(times[i], timezone.utc).isoformat()
            end = datetime.fromtimestamp(times[i + 1], timezone.utc).isoformat()
            raise CarbonConfigError(
                f"[carbon] csv_path {str(path)!r} has a gap of {step:.0f} s between line {lines[i]} "
                f"({start}) and line {lines[i + 1]} ({end}), more than the allowed {max_gap_s:.0f} s; "
                "fill the gap or raise [carbon] csv_max_gap_s"
            )
    return IntensitySeries(tuple(times), tuple(values), max_gap_s)


class CsvIntensityProvider:
    """Intensities from a time series: the value in force at ``when`` is the last row at or
    before it.

    Outside the series nothing fails (a request must not error on a carbon lookup): before the
    first row the first value is used, and more than ``max_gap_s`` after the last row the last
    value is used, with the source labelled ``<source>-stale``; each case is logged once at
    WARNING. ``at`` is the timestamp of the row used.
    """

    def __init__(self, series: IntensitySeries, zone: str, source: str = "csv") -> None:
        self._series = series
        self._zone = zone
        self._source = source
        self._warned_before = False
        self._warned_after = False

    def intensity_at(self, when: datetime) -> Intensity:
        t = _as_utc(when).timestamp()
        times = self._series.times
        i = bisect.bisect_right(times, t) - 1
        if i < 0:
            i = 0
            if not self._warned_before:
                self._warned_before = True
                logger.warning("carbon CSV: %s is before the first row; using the first value", when)
        elif i == len(times) - 1 and t - times[-1] > self._series.max_gap_s:
            if not self._warned_after:
                self._warned_after = True
                logger.warning("carbon CSV: %s is past the end of the series; using the last value", when)
            # labelled, so that responses, the ledger and the gauge show the series has run out
            at = datetime.fromtimestamp(times[i], timezone.utc)
            return Intensity(self._series.values[i], self._zone, self._source + "-stale", at)
        at = datetime.fromtimestamp(times[i], timezone.utc)
        return Intensity(self._series.values[i], self._zone, self._source, at)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------------------
# Live providers
# ---------------------------------------------------------------------------------------------


class _LiveProvider:
    """Background-refreshed cache of one live value, with a static fallback.

    `start` does the first fetch (bounded by ``timeout_s``; a failure is logged and the fallback
    used, so the server still starts) and then refreshes every ``cache_s``. `intensity_at`
    returns the cached value whatever ``when`` is (the value in force now; jobs are charged as
    they finish). After failures the last good value is kept until it is older than
    ``max_age_s``, then the fallback is used, with source ``fallback-static``.
    """

    name = "live"
    default_url = ""

    def __init__(
        self,
        settings: CarbonSettings,
        fallback: Intensity,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._fallback = Intensity(fallback.g_per_kwh, settings.zone, FALLBACK_SOURCE, None)
        self._monotonic = monotonic
        self._max_age_s = settings.max_age_s or max(3.0 * settings.cache_s, 3600.0)
        self._latest: Intensity | None = None
        self._latest_at = 0.0
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failing = False

    @property
    def base_url(self) -> str:
        return (self._settings.api_url or self.default_url).rstrip("/")

    @property
    def fallback(self) -> Intensity:
        return self._fallback

    def intensity_at(self, when: datetime) -> Intensity:
        latest = self._latest
        if latest is not None and self._monotonic() - self._latest_at <= self._max_age_s:
            return latest
        return self._fallback

    async def start(self) -> None:
        self._closing = False
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._settings.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_loop(), name=f"carbon-{self.name}-refresh")

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def refresh(self) -> bool:
        """Fetch now; True on success. Failures are logged, never raised."""
        if self._session is None:
            raise RuntimeError("start() the provider before refreshing it")
        # One deadline for the whole fetch (WattTime makes two requests), applied per request as
        # the time left. Not asyncio.wait_for: on 3.11 it can swallow a cancellation from close().
        deadline = time.monotonic() + self._settings.timeout_s
        try:
            fresh = await self._fetch(self._session, deadline)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError, TypeError) as e:
            reason = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
            current = self.intensity_at(_utcnow())
            logger.log(
                logging.INFO if self._failing else logging.WARNING,  # warn once per outage
                "carbon: %s fetch for zone %s failed (%s); using %s %.1f gCO2e/kWh",
                self.name,
                self._settings.zone,
                reason,
                current.source,
                current.g_per_kwh,
            )
            self._failing = True
            return False
        if self._failing:
            logger.info("carbon: %s fetch for zone %s recovered", self.name, self._settings.zone)
        self._failing = False
        self._latest = fresh
        self._latest_at = self._monotonic()
        return True

    async def _refresh_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._settings.cache_s)
            try:
                await self.refresh()
            except Exception:  # keep refreshing whatever one attempt did
                logger.exception("carbon: %s refresh failed unexpectedly", self.name)

    async def _fetch(self, session: aiohttp.ClientSession, deadline: float) -> Intensity:
        raise NotImplementedError  # abstract: each live provider fetches in its own way

    @staticmethod
    def _time_left(deadline: float) -> aiohttp.ClientTimeout:
        """A request timeout for what is left until ``deadline`` (time.monotonic seconds)."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise asyncio.TimeoutError
        return aiohttp.ClientTimeout(total=left)


def parse_electricitymaps_latest(body: Any, zone: str) -> Intensity:
    """Electricity Maps ``GET /v3/carbon-intensity/latest`` body -> Intensity.

    Documented shape: ``{"zone": "DE", "carbonIntensity": 302, "datetime": "...Z",
    "updatedAt": "...Z", "emissionFactorType": "lifecycle", "isEstimated": true,
    "estimationMethod": "..."}`` with carbonIntensity in gCO2eq/kWh. A response for another zone
    (the API can fall back to the caller's location) is rejected."""
    if not isinstance(body, dict):
        raise ValueError("response is not a JSON object")
    value = _finite_number(body.get("carbonIntensity"))
    if value is None or value < 0:
        raise ValueError(f"carbonIntensity missing or invalid: {body.get('carbonIntensity')!r}")
    got = body.get("zone")
    if not isinstance(got, str) or got.upper() != zone.upper():
        raise ValueError(f"response is for zone {got!r}, not {zone!r}")
    at = parse_timestamp(body["datetime"]) if isinstance(body.get("datetime"), str) else None
    return Intensity(value, zone, ElectricityMapsProvider.name, at)


class ElectricityMapsProvider(_LiveProvider):
    """Electricity Maps v3 ``/carbon-intensity/latest?zone=...`` with the ``auth-token`` header.

    Values are the API's default lifecycle emission factors (gCO2eq/kWh, average intensity of the
    electricity consumed in the zone), like the static table."""

    name = "electricitymaps"
    default_url = ELECTRICITYMAPS_URL

    async def _fetch(self, session: aiohttp.ClientSession, deadline: float) -> Intensity:
        token = self._settings.api_token.get_secret_value() if self._settings.api_token else ""
        async with session.get(
            f"{self.base_url}/v3/carbon-intensity/latest",
            params={"zone": self._settings.zone},
            headers={"auth-token": token},
            timeout=self._time_left(deadline),
        ) as resp:
            resp.raise_for_status()
            body = await resp.json()
        return parse_electricitymaps_latest(body, self._settings.zone)


def parse_watttime_forecast(body: Any, region: str) -> Intensity:
    """WattTime ``GET /v3/forecast`` body -> Intensity of its first point.

    Documented shape: ``{"data": [{"point_time": "...+00:00", "value": 1048.4}, ...], "meta":
    {"region": ..., "signal_type": "co2_moer", "units": "lbs_co2_per_mwh", ...}}``; the first
    point is the estimate for the current 5-minute period. lbs/MWh x 0.45359237 = g/kWh. Any
    other unit, notably ``percentile`` (what ``/v3/signal-index`` returns), is rejected."""
    if not isinstance(body, dict) or not isinstance(body.get("meta"), dict):
        raise ValueError("response has no meta object")
    meta = body["meta"]
    units = meta.get("units")
    if units != "lbs_co2_per_mwh":
        raise ValueError(f"units {units!r} are not lbs_co2_per_mwh; cannot convert to gCO2e/kWh")
    if meta.get("signal_type", "co2_moer") != "co2_moer":
        raise ValueError(f"signal_type {meta.get('signal_type')!r} is not co2_moer")
    data = body.get("data")
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        raise ValueError("response has no data points")
    value = _finite_number(data[0].get("value"))
    if value is None or value < 0:
        raise ValueError(f"data[0].value missing or invalid: {data[0].get('value')!r}")
    point_time = data[0].get("point_time")
    at = parse_timestamp(point_time) if isinstance(point_time, str) else None
    return Intensity(value * G_PER_KWH_PER_LB_PER_MWH, region, WattTimeProvider.name, at)


class WattTimeProvider(_LiveProvider):
    """WattTime v3: ``GET /login`` with HTTP basic auth returns ``{"token": ...}`` (valid 30 min);
    then ``GET /v3/forecast?region=...&signal_type=co2_moer`` with ``Authorization: Bearer``.

    Why not ``/v3/signal-index``: it returns a 0-100 percentile of the current MOER relative to the
    forecast (``meta.units = "percentile"``), which says when to run, not how many grams a kWh
    emits. The forecast endpoint returns the marginal operating emissions rate itself, in
    lbs CO2/MWh, and its first point is the current 5-minute period (the endpoint WattTime
    recommends for real-time use); it needs a data plan except for the preview region
    CAISO_NORTH. Note that a MOER is a marginal rate, not the average intensity of the other
    providers: compare numbers across providers with care.
    """

    name = "watttime"
    default_url = WATTTIME_URL

    def __init__(
        self,
        settings: CarbonSettings,
        fallback: Intensity,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(settings, fallback, monotonic=monotonic)
        self._token: str | None = None
        self._token_at = 0.0

    async def _login(self, session: aiohttp.ClientSession, deadline: float) -> str:
        password = self._settings.password.get_secret_value() if self._settings.password else ""
        auth = aiohttp.BasicAuth(self._settings.username or "", password)
        timeout = self._time_left(deadline)
        async with session.get(f"{self.base_url}/login", auth=auth, timeout=timeout) as resp:
            resp.raise_for_status()
            body = await resp.json()
        token = body.get("token") if isinstance(body, dict) else None
        if not isinstance(token, str) or not token:
            raise ValueError("login response has no token")
        self._token, self._token_at = token, self._monotonic()
        return token

    async def _forecast(self, session: aiohttp.ClientSession, token: str, deadline: float) -> tuple[int, Any]:
        async with session.get(
            f"{self.base_url}/v3/forecast",
            params={"region": self._settings.zone, "signal_type": "co2_moer"},
            headers={"Authorization": f"Bearer {token}"},
            timeout=self._time_left(deadline),
        ) as resp:
            if resp.status == 401:
                return resp.status, None
            resp.raise_for_status()
            return resp.status, await resp.json()

    async def _fetch(self, session: aiohttp.ClientSession, deadline: float) -> Intensity:
        token = self._token
        if token is None or self._monotonic() - self._token_at > WATTTIME_TOKEN_RENEW_S:
            token = await self._login(session, deadline)
        status, body = await self._forecast(session, token, deadline)
        if status == 401:  # token revoked or expired early: log in once more
            self._token = None
            status, body = await self._forecast(session, await self._login(session, deadline), deadline)
            if status == 401:
                raise ValueError("forecast refused with 401 right after login; check the plan and region")
        return parse_watttime_forecast(body, self._settings.zone)


# ---------------------------------------------------------------------------------------------
# The model and its construction
# ---------------------------------------------------------------------------------------------


class CarbonModel:
    """Pure arithmetic over one intensity provider: kWh and GPU-seconds -> gCO2e."""

    def __init__(
        self,
        settings: CarbonSettings,
        provider: IntensityProvider,
        *,
        clock: Callable[[], datetime] = _utcnow,
    ) -> None:
        _check_common(settings)
        self.settings = settings
        self.provider = provider
        self._clock = clock
        self._embodied_rate = embodied_g_per_gpu_second(settings) if settings.embodied else 0.0

    @property
    def embodied_g_per_gpu_second(self) -> float:
        """gCO2e charged per GPU-second (0 when the embodied share is disabled)."""
        return self._embodied_rate

    def charge(self, energy_kwh: float, when: datetime, gpu_seconds: float = 0.0) -> CarbonCharge:
        """Carbon for ``energy_kwh`` (kWh) drawn by a job at ``when`` that held the GPU(s) for
        ``gpu_seconds`` (GPU count x seconds). No I/O."""
        if not (energy_kwh >= 0 and math.isfinite(energy_kwh)):
            raise ValueError(f"energy_kwh must be a finite number >= 0, got {energy_kwh!r}")
        if not (gpu_seconds >= 0 and math.isfinite(gpu_seconds)):
            raise ValueError(f"gpu_seconds must be a finite number >= 0, got {gpu_seconds!r}")
        intensity = self.provider.intensity_at(when)
        pue = self.settings.pue
        operational = energy_kwh * intensity.g_per_kwh * pue
        embodied = gpu_seconds * self._embodied_rate
        return CarbonCharge(  # positional, in field order (hot path: keywords cost more)
            operational + embodied,  # co2_grams
            operational,  # operational_co2_grams
            embodied,  # embodied_co2_grams
            intensity.g_per_kwh,  # intensity_g_per_kwh
            pue,  # pue
            intensity.zone,  # zone
            intensity.source,  # source
        )

    def current(self) -> Intensity:
        """The intensity in force now (for the carbon-intensity gauge)."""
        return self.provider.intensity_at(self._clock())

    async def start(self) -> None:
        await self.provider.start()

    async def close(self) -> None:
        await self.provider.close()


def _positive(value: float | None, setting: str, hint: str) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise CarbonConfigError(f"[carbon] {setting} must be a number > 0 ({hint}), got {value!r}")


def _check_common(settings: CarbonSettings) -> None:
    pue = settings.pue
    if not (math.isfinite(pue) and pue >= 1.0):
        raise CarbonConfigError(
            f"[carbon] pue must be a number >= 1.0 (total facility energy / IT energy; 1.0 means no "
            f"overhead, typical data centres report 1.1-1.6), got {pue!r}"
        )
    for name in ("embodied_device_kgco2e", "embodied_server_share_kgco2e"):
        value = getattr(settings, name)
        if not (math.isfinite(value) and value >= 0):
            raise CarbonConfigError(f"[carbon] {name} must be a number >= 0 (kgCO2e), got {value!r}")
    _positive(settings.lifetime_years, "lifetime_years", "hardware life in years")


def validate_carbon_settings(settings: CarbonSettings, table: Mapping[str, StaticEntry]) -> None:
    """Raise CarbonConfigError for the first wrong setting, with how to fix it."""
    _check_common(settings)
    _positive(settings.timeout_s, "timeout_s", "seconds")
    _positive(settings.cache_s, "cache_s", "seconds")
    _positive(settings.max_age_s, "max_age_s", "seconds")
    _positive(settings.csv_max_gap_s, "csv_max_gap_s", "seconds")
    if not settings.zone.strip():
        raise CarbonConfigError("[carbon] zone must not be empty")
    provider = settings.provider
    if provider == "static" and settings.zone.strip().upper() not in table:
        raise _unknown_zone(settings.zone, table, "zone")
    if provider == "fixed":
        value = settings.fixed_g_per_kwh
        if value is None:
            raise CarbonConfigError('[carbon] provider = "fixed" needs fixed_g_per_kwh (gCO2e/kWh)')
        if not (math.isfinite(value) and value >= 0):
            raise CarbonConfigError(f"[carbon] fixed_g_per_kwh must be a number >= 0, got {value!r}")
    if provider == "csv" and settings.csv_path is None:
        raise CarbonConfigError('[carbon] provider = "csv" needs csv_path (a timestamp,g_per_kwh file)')
    if provider == "electricitymaps":
        if settings.api_token is None or not settings.api_token.get_secret_value():
            raise CarbonConfigError(
                '[carbon] provider = "electricitymaps" needs api_token (the auth-token from the '
                "Electricity Maps API portal)"
            )
        if settings.zone.strip().upper() == WORLD:
            raise CarbonConfigError(
                '[carbon] provider = "electricitymaps" needs zone set to an Electricity Maps zone id, '
                'e.g. "DE" or "US-CAL-CISO"'
            )
    if provider == "watttime":
        if not settings.username or settings.password is None or not settings.password.get_secret_value():
            raise CarbonConfigError(
                '[carbon] provider = "watttime" needs username and password (a WattTime API account)'
            )
        if settings.zone.strip().upper() == WORLD:
            raise CarbonConfigError(
                '[carbon] provider = "watttime" needs zone set to a WattTime region, e.g. "CAISO_NORTH"'
            )
    if settings.fallback_zone is not None and settings.fallback_zone.strip().upper() not in table:
        raise _unknown_zone(settings.fallback_zone, table, "fallback_zone")


def fallback_entry(settings: CarbonSettings, table: Mapping[str, StaticEntry]) -> StaticEntry:
    """The static row a live provider falls back to: ``fallback_zone`` if set, else the zone's
    country prefix ("US-CAL-CISO" -> "US", "DE" -> "DE") when the table has it, else WORLD."""
    if settings.fallback_zone is not None:
        return table[settings.fallback_zone.strip().upper()]
    country = settings.zone.strip().upper().replace("_", "-").split("-")[0]
    return table.get(country, table[WORLD])


def build_provider(settings: CarbonSettings, table: Mapping[str, StaticEntry]) -> IntensityProvider:
    """The provider named by ``settings.provider`` (settings already validated)."""
    zone = settings.zone.strip()
    if settings.provider == "static":
        return ConstantIntensityProvider(table[zone.upper()].intensity())
    if settings.provider == "fixed":
        assert settings.fixed_g_per_kwh is not None
        return ConstantIntensityProvider(Intensity(settings.fixed_g_per_kwh, zone, "fixed:config", None))
    if settings.provider == "csv":
        assert settings.csv_path is not None
        return CsvIntensityProvider(load_intensity_csv(settings.csv_path, settings.csv_max_gap_s), zone)
    fallback = fallback_entry(settings, table).intensity()
    if settings.provider == "electricitymaps":
        return ElectricityMapsProvider(settings, fallback)
    return WattTimeProvider(settings, fallback)


def build_carbon(settings: CarbonSettings) -> CarbonModel:
    """Validate the settings, load the table or CSV, and return the model (not yet started:
    ``await model.start()`` in the app's startup, ``await model.close()`` at shutdown)."""
    table = load_static_table()
    validate_carbon_settings(settings, table)
    return CarbonModel(settings, build_provider(settings, table))
