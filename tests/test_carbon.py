"""proxy.carbon: arithmetic, the shipped table, CSV series, and the live providers against a
local aiohttp server that answers with the documented Electricity Maps and WattTime shapes."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pydantic
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from proxy.carbon import (
    FALLBACK_SOURCE,
    G_PER_KWH_PER_LB_PER_MWH,
    SECONDS_PER_YEAR,
    CarbonConfigError,
    CarbonModel,
    CarbonSettings,
    ConstantIntensityProvider,
    ElectricityMapsProvider,
    Intensity,
    WattTimeProvider,
    build_carbon,
    embodied_g_per_gpu_second,
    kwh_from_joules,
    load_intensity_csv,
    load_static_table,
)

UTC = timezone.utc
T0 = datetime(2024, 5, 1, 0, 0, tzinfo=UTC)


def fixed_model(g_per_kwh: float, pue: float = 1.0, **kw: Any) -> CarbonModel:
    return build_carbon(CarbonSettings(provider="fixed", fixed_g_per_kwh=g_per_kwh, pue=pue, **kw))


# --- arithmetic ------------------------------------------------------------------------------


def test_kwh_from_joules() -> None:
    assert kwh_from_joules(3.6e6) == 1.0
    assert kwh_from_joules(756.0) == pytest.approx(2.1e-4)


def test_charge_is_kwh_times_intensity_times_pue() -> None:
    model = fixed_model(400.0, pue=1.5)
    charge = model.charge(0.002, T0)
    assert charge.operational_co2_grams == 0.002 * 400.0 * 1.5
    assert charge.co2_grams == charge.operational_co2_grams
    assert charge.embodied_co2_grams == 0.0
    assert (charge.intensity_g_per_kwh, charge.pue, charge.source) == (400.0, 1.5, "fixed:config")


def test_static_zone_charge_names_zone_and_source() -> None:
    model = build_carbon(CarbonSettings(zone="de", pue=1.2))
    charge = model.charge(1.0, T0)
    assert charge.co2_grams == pytest.approx(381 * 1.2)
    assert charge.zone == "DE"
    assert charge.source == "static:OWID/Ember 2023"
    assert model.current().g_per_kwh == 381


@given(
    kwh=st.floats(min_value=1e-9, max_value=1e3),
    pue=st.floats(min_value=1.0, max_value=3.0),
    zones=st.lists(st.sampled_from(sorted(load_static_table())), min_size=2, max_size=2, unique=True),
)
def test_co2_ratio_between_zones_is_the_intensity_ratio(kwh: float, pue: float, zones: list[str]) -> None:
    table = load_static_table()
    a, b = (build_carbon(CarbonSettings(zone=z, pue=pue)).charge(kwh, T0) for z in zones)
    ia, ib = table[zones[0]].g_per_kwh, table[zones[1]].g_per_kwh
    if ib > 0:
        assert a.co2_grams / b.co2_grams == pytest.approx(ia / ib, rel=1e-12)


@given(kwh=st.floats(min_value=0.0, max_value=1e3), k=st.integers(min_value=0, max_value=1000))
def test_charge_is_linear_in_energy(kwh: float, k: int) -> None:
    model = fixed_model(369.47, pue=1.3)
    expected = k * model.charge(kwh, T0).co2_grams
    assert model.charge(kwh * k, T0).co2_grams == pytest.approx(expected, rel=1e-12)


def test_charge_rejects_negative_or_nan_inputs() -> None:
    model = fixed_model(100.0)
    for kwh, gpu_s in ((-1.0, 0.0), (math.nan, 0.0), (1.0, -1.0), (1.0, math.inf)):
        with pytest.raises(ValueError):
            model.charge(kwh, T0, gpu_s)


# --- embodied share --------------------------------------------------------------------------


def test_embodied_share_per_gpu_second_is_kg_over_lifetime() -> None:
    model = fixed_model(0.0, embodied=True, embodied_device_kgco2e=164.0, embodied_server_share_kgco2e=712.5)
    lifetime_s = 3.0 * 365 * 24 * 3600
    rate = (164.0 + 712.5) * 1000.0 / lifetime_s
    assert model.embodied_g_per_gpu_second == pytest.approx(rate, rel=1e-15)
    assert model.charge(0.0, T0, gpu_seconds=1.0).embodied_co2_grams == pytest.approx(rate, rel=1e-15)
    assert SECONDS_PER_YEAR == 365 * 24 * 3600


@given(gpu_s=st.floats(min_value=0.0, max_value=1e6), k=st.integers(min_value=0, max_value=64))
def test_embodied_share_scales_linearly_with_gpu_seconds(gpu_s: float, k: int) -> None:
    model = fixed_model(100.0, pue=1.4, embodied=True, lifetime_years=4.0)
    one = model.charge(0.5, T0, gpu_s)
    many = model.charge(0.5, T0, gpu_s * k)
    assert many.embodied_co2_grams == pytest.approx(k * one.embodied_co2_grams, rel=1e-12, abs=1e-300)
    assert many.operational_co2_grams == one.operational_co2_grams == 0.5 * 100.0 * 1.4  # PUE not on embodied
    assert many.co2_grams == many.operational_co2_grams + many.embodied_co2_grams


def test_embodied_disabled_charges_nothing_for_gpu_time() -> None:
    model = fixed_model(100.0)
    assert model.embodied_g_per_gpu_second == 0.0
    assert model.charge(1.0, T0, gpu_seconds=3600.0).embodied_co2_grams == 0.0
    defaults = CarbonSettings()
    assert embodied_g_per_gpu_second(defaults) == pytest.approx(876.5e3 / (3 * SECONDS_PER_YEAR))


# --- the shipped table -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "g_per_kwh"),
    [("WORLD", 475.0), ("FR", 56.0), ("DE", 381.0), ("US", 369.5), ("PL", 661.9), ("IN", 713.4)],
)
def test_static_table_values(zone: str, g_per_kwh: float) -> None:
    assert load_static_table()[zone].g_per_kwh == pytest.approx(g_per_kwh, abs=0.05)


def test_static_table_rows_cite_source_and_year() -> None:
    table = load_static_table()
    assert len(table) >= 40
    for required in ("GB", "CN", "JP", "SE", "NO", "BR", "CA", "AU", "ZA"):
        assert required in table
    for entry in table.values():
        assert entry.source and 2015 <= entry.year <= 2025
        assert 0.0 <= entry.g_per_kwh < 1500.0
        zone = entry.zone
        assert zone == "WORLD" or (len(zone) == 2 and zone.isalpha() and zone.isupper()), zone


def test_unknown_static_zone_fails_with_examples() -> None:
    with pytest.raises(CarbonConfigError, match=r"'XX'.*e\.g\. DE, FR, US"):
        build_carbon(CarbonSettings(zone="XX"))


@pytest.mark.parametrize("pue", [-1.0, 0.0, 0.99, math.nan, math.inf])
def test_bad_pue_fails(pue: float) -> None:
    with pytest.raises(CarbonConfigError, match=r"pue must be a number >= 1\.0"):
        build_carbon(CarbonSettings(pue=pue))


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (CarbonSettings(provider="fixed"), "needs fixed_g_per_kwh"),
        (CarbonSettings(provider="fixed", fixed_g_per_kwh=-3.0), "fixed_g_per_kwh must be"),
        (CarbonSettings(provider="csv"), "needs csv_path"),
        (CarbonSettings(provider="electricitymaps", zone="DE"), "needs api_token"),
        (CarbonSettings(provider="electricitymaps", api_token="t"), "Electricity Maps zone id"),
        (CarbonSettings(provider="watttime", zone="CAISO_NORTH", username="u"), "username and password"),
        (CarbonSettings(provider="watttime", zone="CAISO_NORTH", password="p"), "username and password"),
        (CarbonSettings(timeout_s=0.0), "timeout_s must be"),
        (CarbonSettings(cache_s=-1.0), "cache_s must be"),
        (CarbonSettings(lifetime_years=0.0), "lifetime_years must be"),
        (CarbonSettings(embodied_device_kgco2e=-1.0), "embodied_device_kgco2e must be"),
        (
            CarbonSettings(provider="electricitymaps", zone="DE", api_token="t", fallback_zone="ZZ"),
            "fallback_zone",
        ),
    ],
)
def test_bad_configuration_fails_at_build(settings: CarbonSettings, match: str) -> None:
    with pytest.raises(CarbonConfigError, match=match):
        build_carbon(settings)


def test_settings_reject_unknown_keys_and_hide_secrets() -> None:
    with pytest.raises(pydantic.ValidationError):
        CarbonSettings(provder="static")  # type: ignore[call-arg]
    settings = CarbonSettings(provider="electricitymaps", api_token="s3cret", password="pw")
    assert "s3cret" not in repr(settings) and "pw'" not in repr(settings)


# --- CSV series ------------------------------------------------------------------------------


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "intensity.csv"
    path.write_text(text, encoding="utf-8")
    return path


HOURLY = """timestamp,g_per_kwh
# three hours of data
2024-05-01T00:00:00Z,100
2024-05-01T01:00:00Z,200
2024-05-01T04:00:00+02:00,300
"""


def csv_model(tmp_path: Path, text: str = HOURLY, **kw: Any) -> CarbonModel:
    return build_carbon(CarbonSettings(provider="csv", zone="DE", csv_path=write_csv(tmp_path, text), **kw))


def test_csv_switches_value_at_its_timestamps(tmp_path: Path) -> None:
    model = csv_model(tmp_path)
    one = T0 + timedelta(hours=1)
    tick = timedelta(microseconds=1)
    assert model.charge(1.0, T0).intensity_g_per_kwh == 100
    assert model.charge(1.0, one - tick).intensity_g_per_kwh == 100
    assert model.charge(1.0, one).intensity_g_per_kwh == 200
    assert model.charge(1.0, one + tick).intensity_g_per_kwh == 200
    assert model.charge(1.0, T0 + timedelta(hours=2)).intensity_g_per_kwh == 300  # 04:00+02:00 is 02:00Z
    got = model.provider.intensity_at(one + timedelta(minutes=30))
    assert (got.source, got.zone, got.at) == ("csv", "DE", one)


def test_csv_naive_and_offset_times_are_utc(tmp_path: Path) -> None:
    model = csv_model(tmp_path, "2024-05-01T00:00:00,10\n2024-05-01T01:00:00,20\n")
    assert model.charge(1.0, datetime(2024, 5, 1, 1, 0)).intensity_g_per_kwh == 20  # naive: UTC
    paris = timezone(timedelta(hours=2))
    assert model.charge(1.0, datetime(2024, 5, 1, 2, 59, tzinfo=paris)).intensity_g_per_kwh == 10
    assert model.charge(1.0, datetime(2024, 5, 1, 3, 0, tzinfo=paris)).intensity_g_per_kwh == 20


def test_csv_outside_the_series_uses_the_nearest_end_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = csv_model(tmp_path)
    with caplog.at_level(logging.WARNING, logger="proxy.carbon"):
        assert model.charge(1.0, T0 - timedelta(days=1)).intensity_g_per_kwh == 100
        assert model.charge(1.0, T0 - timedelta(days=2)).intensity_g_per_kwh == 100
        within = model.charge(1.0, T0 + timedelta(hours=3))  # within tolerance
        assert within.intensity_g_per_kwh == 300 and not within.source.endswith("-stale")
        assert not [r for r in caplog.records if "past the end" in r.message]
        for days in (1, 2, 3):
            past = model.charge(1.0, T0 + timedelta(days=days))
            assert past.intensity_g_per_kwh == 300 and past.source.endswith("-stale")  # says so
    assert len([r for r in caplog.records if "before the first row" in r.message]) == 1
    assert len([r for r in caplog.records if "past the end" in r.message]) == 1


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "has no timestamp,g_per_kwh rows"),
        ("timestamp,g_per_kwh\n", "has no timestamp,g_per_kwh rows"),
        ("2024-05-01T01:00Z,1\n2024-05-01T00:00Z,2\n", "line 2.*does not come after line 1"),
        ("2024-05-01T00:00Z,1\n2024-05-01T00:00Z,2\n", "strictly increasing"),
        ("2024-05-01T00:00Z,1\n2024-05-01T01:00Z,x\n", "line 2.*not a number"),
        ("2024-05-01T00:00Z,1\nyesterday,2\n", "line 2.*not an ISO 8601"),
        ("2024-05-01T00:00Z,-5\n", "finite number >= 0"),
        ("2024-05-01T00:00Z,nan\n", "finite number >= 0"),
        ("2024-05-01T00:00Z\n", "expected timestamp,g_per_kwh"),
        (
            "2024-05-01T00:00Z,1\n2024-05-01T01:00Z,2\n2024-05-01T02:00Z,3\n2024-05-01T06:00Z,4\n",
            r"gap of 14400 s between line 3.*and line 4.*allowed 7200 s.*csv_max_gap_s",
        ),
    ],
)
def test_csv_validation_errors(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(CarbonConfigError, match=match):
        csv_model(tmp_path, text)


def test_csv_gap_tolerance_can_be_raised(tmp_path: Path) -> None:
    text = "2024-05-01T00:00Z,1\n2024-05-01T01:00Z,2\n2024-05-01T02:00Z,3\n2024-05-01T07:00Z,4\n"
    with pytest.raises(CarbonConfigError, match="gap of 18000 s"):
        csv_model(tmp_path, text)
    model = csv_model(tmp_path, text, csv_max_gap_s=6 * 3600)
    assert model.charge(1.0, T0 + timedelta(hours=6)).co2_grams == 3


def test_csv_unreadable_file_fails(tmp_path: Path) -> None:
    with pytest.raises(CarbonConfigError, match="cannot be read"):
        build_carbon(CarbonSettings(provider="csv", csv_path=tmp_path / "missing.csv"))
    with pytest.raises(CarbonConfigError, match="cannot be read"):
        build_carbon(CarbonSettings(provider="csv", csv_path=tmp_path))  # a directory
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CarbonConfigError, match="cannot be read"):
        load_intensity_csv(binary)


def test_csv_single_row_is_constant(tmp_path: Path) -> None:
    model = csv_model(tmp_path, "2024-01-01T00:00:00Z,123.5\n")
    assert model.charge(1.0, T0 + timedelta(days=300)).intensity_g_per_kwh == 123.5


# --- live providers: a local server with the documented shapes -----------------------------


@dataclass
class FakeApis:
    """Electricity Maps and WattTime as documented; `mode` injects failures."""

    mode: str = "ok"  # ok | error500 | slow | wrong_zone | percentile | expire_token_once | login_forbidden
    em_value: float = 302.0
    wt_lbs_per_mwh: float = 1000.0
    em_requests: list[web.Request] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    forecasts: list[web.Request] = field(default_factory=list)
    tokens_issued: int = 0
    expired_once: bool = False

    async def em_latest(self, request: web.Request) -> web.Response:
        self.em_requests.append(request)
        if request.headers.get("auth-token") != "em-token":
            return web.json_response({"status": "error", "message": "Invalid auth-token"}, status=401)
        if self.mode == "error500":
            return web.json_response({"status": "error", "message": "internal"}, status=500)
        if self.mode == "slow":
            await asyncio.sleep(1.0)
        zone = request.query["zone"]
        return web.json_response(
            {
                "zone": "FR" if self.mode == "wrong_zone" else zone,
                "carbonIntensity": self.em_value,
                "datetime": "2018-04-25T18:00:00.000Z",
                "updatedAt": "2018-04-25T18:07:01.000Z",
                "createdAt": "2018-04-22T18:07:01.000Z",
                "emissionFactorType": "lifecycle",
                "isEstimated": True,
                "estimationMethod": "TIME_SLICER_AVERAGE",
            }
        )

    async def wt_login(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        basic = header.startswith("Basic ")
        user_pass = base64.b64decode(header.removeprefix("Basic ")).decode() if basic else ""
        self.logins.append(user_pass)
        if self.mode == "login_forbidden" or user_pass != "alice:wonder":
            return web.json_response({"error": "unauthorized"}, status=403)
        self.tokens_issued += 1
        return web.json_response({"token": f"jwt-{self.tokens_issued}"})

    async def wt_forecast(self, request: web.Request) -> web.Response:
        self.forecasts.append(request)
        if request.headers.get("Authorization") != f"Bearer jwt-{self.tokens_issued}":
            return web.json_response({"error": "invalid token"}, status=401)
        if self.mode == "expire_token_once" and not self.expired_once:
            self.expired_once = True
            return web.json_response({"error": "Token has expired"}, status=401)
        if self.mode == "error500":
            return web.Response(status=500, text="oops")
        units = "percentile" if self.mode == "percentile" else "lbs_co2_per_mwh"
        return web.json_response(
            {
                "data": [
                    {"point_time": "2022-07-15T00:00:00+00:00", "value": self.wt_lbs_per_mwh},
                    {"point_time": "2022-07-15T00:05:00+00:00", "value": 1051.0880801214637},
                ],
                "meta": {
                    "data_point_period_seconds": 300,
                    "region": request.query["region"],
                    "warnings": [],
                    "signal_type": request.query["signal_type"],
                    "model": {"date": "2023-03-01"},
                    "units": units,
                    "generated_at_period_seconds": 300,
                    "generated_at": "2022-07-15T00:00:00+00:00",
                },
            }
        )


ServerFactory = Callable[[web.Application], Awaitable[Any]]


@pytest.fixture
async def fake(aiohttp_server: ServerFactory) -> tuple[FakeApis, str]:
    apis = FakeApis()
    app = web.Application()
    app.router.add_get("/v3/carbon-intensity/latest", apis.em_latest)
    app.router.add_get("/login", apis.wt_login)
    app.router.add_get("/v3/forecast", apis.wt_forecast)
    server = await aiohttp_server(app)
    return apis, str(server.make_url("")).rstrip("/")


def em_settings(url: str, **kw: Any) -> CarbonSettings:
    base: dict[str, Any] = {
        "provider": "electricitymaps",
        "zone": "DE",
        "api_token": "em-token",
        "api_url": url,
    }
    return CarbonSettings(**{**base, **kw})


def wt_settings(url: str, **kw: Any) -> CarbonSettings:
    base: dict[str, Any] = {
        "provider": "watttime",
        "zone": "CAISO_NORTH",
        "username": "alice",
        "password": "wonder",
        "api_url": url,
        "fallback_zone": "US",
    }
    return CarbonSettings(**{**base, **kw})


async def test_electricitymaps_latest_value_with_auth_token(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    model = build_carbon(em_settings(url, pue=1.1))
    await model.start()
    try:
        got = model.current()
        assert (got.g_per_kwh, got.zone, got.source) == (302.0, "DE", "electricitymaps")
        assert got.at == datetime(2018, 4, 25, 18, 0, tzinfo=UTC)
        request = apis.em_requests[0]
        assert request.headers["auth-token"] == "em-token"
        assert request.query["zone"] == "DE"
        assert model.charge(0.01, T0).co2_grams == pytest.approx(0.01 * 302.0 * 1.1)
    finally:
        await model.close()


async def test_electricitymaps_http_500_falls_back_to_static(
    fake: tuple[FakeApis, str], caplog: pytest.LogCaptureFixture
) -> None:
    apis, url = fake
    apis.mode = "error500"
    model = build_carbon(em_settings(url, zone="US-CAL-CISO"))
    with caplog.at_level(logging.WARNING, logger="proxy.carbon"):
        await model.start()
    try:
        got = model.current()
        assert got.source == FALLBACK_SOURCE
        assert got.zone == "US-CAL-CISO"
        assert got.g_per_kwh == load_static_table()["US"].g_per_kwh  # country prefix of the zone
        assert len(apis.em_requests) == 1
        assert any("electricitymaps fetch for zone US-CAL-CISO failed" in r.message for r in caplog.records)
    finally:
        await model.close()


async def test_electricitymaps_timeout_falls_back_within_the_timeout(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    apis.mode = "slow"
    model = build_carbon(em_settings(url, timeout_s=0.2))
    started = time.monotonic()
    await model.start()
    elapsed = time.monotonic() - started
    try:
        assert elapsed < 0.8
        got = model.current()
        assert (got.source, got.g_per_kwh) == (FALLBACK_SOURCE, 381)
    finally:
        await model.close()


async def test_electricitymaps_answer_for_another_zone_is_rejected(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    apis.mode = "wrong_zone"
    model = build_carbon(em_settings(url))
    await model.start()
    try:
        assert model.current().source == FALLBACK_SOURCE
    finally:
        await model.close()


async def test_electricitymaps_bad_token_falls_back(fake: tuple[FakeApis, str]) -> None:
    _, url = fake
    model = build_carbon(em_settings(url, api_token="wrong"))
    await model.start()
    try:
        assert model.current().source == FALLBACK_SOURCE
    finally:
        await model.close()


async def test_live_value_is_cached_then_refreshed_after_cache_s(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    model = build_carbon(em_settings(url, cache_s=1.0))
    await model.start()
    try:
        for _ in range(50):
            assert model.current().g_per_kwh == 302.0
            model.charge(0.001, T0)
        assert len(apis.em_requests) == 1  # the hot path never fetches
        apis.em_value = 250.0
        await asyncio.sleep(0.1)
        assert len(apis.em_requests) == 1  # still within cache_s
        # The fake records a request when it arrives, before the refresher has read the
        # answer: wait for the new value itself, not only for the second request.
        for _ in range(100):
            if model.current().g_per_kwh == 250.0:
                break
            await asyncio.sleep(0.05)
        assert model.current().g_per_kwh == 250.0
        assert len(apis.em_requests) >= 2
    finally:
        await model.close()
    count = len(apis.em_requests)
    await asyncio.sleep(1.3)  # past cache_s: a refresher still running would have fetched
    assert len(apis.em_requests) == count  # close() stopped the refresher


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_last_good_value_kept_until_max_age_then_fallback(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    settings = em_settings(url, cache_s=3600.0, max_age_s=600.0)
    clock = FakeMonotonic()
    provider = ElectricityMapsProvider(settings, Intensity(381.0, "DE", "static:x", None), monotonic=clock)
    model = CarbonModel(settings, provider)
    await model.start()
    try:
        assert model.current().source == "electricitymaps"
        apis.mode = "error500"
        clock.now += 300.0
        assert await provider.refresh() is False
        assert (model.current().source, model.current().g_per_kwh) == ("electricitymaps", 302.0)
        clock.now += 301.0  # last success is now 601 s old
        assert (model.current().source, model.current().g_per_kwh) == (FALLBACK_SOURCE, 381.0)
        apis.mode = "ok"
        assert await provider.refresh() is True
        assert model.current().source == "electricitymaps"
    finally:
        await model.close()


async def test_watttime_login_and_forecast_converted_to_g_per_kwh(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    model = build_carbon(wt_settings(url))
    await model.start()
    try:
        got = model.current()
        assert got.source == "watttime"
        assert got.zone == "CAISO_NORTH"
        assert got.g_per_kwh == pytest.approx(1000.0 * 0.45359237, rel=1e-15)
        assert pytest.approx(0.453592, abs=1e-6) == G_PER_KWH_PER_LB_PER_MWH
        assert got.at == datetime(2022, 7, 15, tzinfo=UTC)
        assert apis.logins == ["alice:wonder"]  # HTTP basic auth on /login
        forecast = apis.forecasts[0]
        assert forecast.headers["Authorization"] == "Bearer jwt-1"
        assert dict(forecast.query) == {"region": "CAISO_NORTH", "signal_type": "co2_moer"}
    finally:
        await model.close()


async def test_watttime_token_is_reused_and_renewed_on_401(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    settings = wt_settings(url)
    provider = WattTimeProvider(settings, Intensity(369.47, "US", "static:x", None))
    await provider.start()
    try:
        assert await provider.refresh() is True
        assert len(apis.logins) == 1 and len(apis.forecasts) == 2  # token reused
        apis.mode = "expire_token_once"
        assert await provider.refresh() is True
        assert len(apis.logins) == 2  # logged in again after the 401
        assert provider.intensity_at(T0).source == "watttime"
    finally:
        await provider.close()


@pytest.mark.parametrize("mode", ["percentile", "login_forbidden", "error500"])
async def test_watttime_failures_fall_back_to_static(fake: tuple[FakeApis, str], mode: str) -> None:
    apis, url = fake
    apis.mode = mode
    model = build_carbon(wt_settings(url))
    await model.start()
    try:
        got = model.current()
        assert (got.source, got.zone) == (FALLBACK_SOURCE, "CAISO_NORTH")
        assert got.g_per_kwh == load_static_table()["US"].g_per_kwh
    finally:
        await model.close()


async def test_watttime_region_without_country_falls_back_to_world(fake: tuple[FakeApis, str]) -> None:
    apis, url = fake
    apis.mode = "error500"
    model = build_carbon(wt_settings(url, fallback_zone=None))
    await model.start()
    try:
        assert model.current().g_per_kwh == 475
    finally:
        await model.close()


async def test_unreachable_api_falls_back(unused_tcp_port: int) -> None:
    model = build_carbon(em_settings(f"http://127.0.0.1:{unused_tcp_port}", timeout_s=1.0))
    await model.start()
    try:
        assert model.current().source == FALLBACK_SOURCE
    finally:
        await model.close()
        await model.close()  # idempotent


async def test_static_and_fixed_providers_need_no_start() -> None:
    provider = ConstantIntensityProvider(Intensity(1.0, "X", "fixed:config", None))
    await provider.start()
    assert provider.intensity_at(T0).g_per_kwh == 1.0
    await provider.close()
