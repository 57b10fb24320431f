"""Carbon through the live server: zone and PUE flow into each response, the headers and /metrics."""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer


def _chat(server: LiveServer) -> tuple[dict[str, float], Any]:
    c = openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)
    raw = c.chat.completions.with_raw_response.create(
        model="tiny-gpt2", messages=[{"role": "user", "content": "same prompt"}], max_tokens=6, temperature=0
    )
    return raw.parse().usage.model_extra["energy"], raw.headers  # type: ignore[union-attr,index]


def test_co2_follows_zone_intensity_and_pue(make_server) -> None:  # type: ignore[no-untyped-def]
    fr = make_server(carbon={"zone": "FR", "pue": 1.5})
    de = make_server(carbon={"zone": "DE", "pue": 1.5})
    e_fr, headers = _chat(fr)
    e_de, _ = _chat(de)
    assert e_fr["carbon_intensity_g_per_kwh"] == 56.0 and e_de["carbon_intensity_g_per_kwh"] == 381.0
    assert e_fr["pue"] == 1.5
    per_kwh_fr = e_fr["co2_grams"] / e_fr["kwh"]
    per_kwh_de = e_de["co2_grams"] / e_de["kwh"]
    assert math.isclose(per_kwh_fr, 56.0 * 1.5, rel_tol=1e-9)
    assert math.isclose(per_kwh_de / per_kwh_fr, 381.0 / 56.0, rel_tol=1e-9)
    assert float(headers["X-CO2-Grams"]) == e_fr["co2_grams"]


def test_metrics_agree_with_the_sum_of_responses(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(carbon={"provider": "static", "zone": "PL", "embodied": True})
    responses = [_chat(server)[0] for _ in range(4)]
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    co2_total = intensity = None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "wattproxy_co2_grams_total":
                co2_total = (co2_total or 0.0) + s.value
            if s.name == "wattproxy_carbon_intensity_grams_per_kwh":
                intensity = (s.labels, s.value)
    assert co2_total is not None
    assert math.isclose(co2_total, sum(r["co2_grams"] for r in responses), rel_tol=1e-9)
    assert all(r["embodied_co2_grams"] > 0 for r in responses)
    assert intensity is not None and intensity[0]["zone"] == "PL"
    assert intensity[1] == responses[0]["carbon_intensity_g_per_kwh"] == pytest.approx(661.9, abs=0.05)
