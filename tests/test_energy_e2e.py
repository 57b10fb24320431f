"""Energy end to end: many concurrent requests of both tasks through a live server; every joule the
meter saw is either in a response or idle, and /metrics tells the same story."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from proxy.state import MONITORS
from tests.conftest import LiveServer


def _client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def _drive(
    server: LiveServer, chats: int = 12, images: int = 4, completions: int = 4
) -> list[dict[str, float]]:
    c = _client(server)

    def chat(i: int) -> dict[str, float]:
        r = c.chat.completions.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": "tell me " * (1 + i % 5)}],
            max_tokens=2 + i % 7,
            temperature=0,
        )
        return r.usage.model_extra["energy"]  # type: ignore[union-attr,index]

    def image(i: int) -> dict[str, float]:
        r = c.images.generate(
            model="tiny-sd", prompt=f"a cat {i}", n=1 + i % 2, size="64x64", extra_body={"steps": 2}
        )
        return r.usage.model_extra["energy"]  # type: ignore[union-attr]

    def completion(i: int) -> dict[str, float]:
        r = c.completions.create(model="tiny-gpt2", prompt=f"number {i}", max_tokens=3, temperature=0)
        return r.usage.model_extra["energy"]  # type: ignore[union-attr,index]

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(chat, i) for i in range(chats)]
        futures += [pool.submit(image, i) for i in range(images)]
        futures += [pool.submit(completion, i) for i in range(completions)]
        return [f.result(timeout=120) for f in futures]


def _metric_sums(server: LiveServer) -> dict[str, float]:
    text = requests.get(server.base_url + "/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            sums[s.name] = sums.get(s.name, 0.0) + s.value
    return sums


@pytest.mark.parametrize("update_period_s", [0.0, 0.05])
@pytest.mark.parametrize("idle_policy", ["separate", "amortize"])
def test_every_joule_is_in_a_response_or_idle(make_server, update_period_s: float, idle_policy: str) -> None:  # type: ignore[no-untyped-def]
    server = make_server(
        idle_policy=idle_policy,
        energy={
            "synthetic_update_period_s": update_period_s,
            "sample_period_s": 0.01,
            "max_finalize_delay_s": 0.5,
        },
    )
    energies = _drive(server)
    assert all(e["measurement"] == "synthetic" for e in energies)
    assert all(e["joules"] > 0 for e in energies)
    answered_j = sum(e["joules"] for e in energies)

    sums = _metric_sums(server)
    attributed_kwh = sums["wattproxy_energy_kwh_total"]
    assert math.isclose(attributed_kwh * 3.6e6, answered_j, rel_tol=1e-9)
    assert math.isclose(
        attributed_kwh + sums["wattproxy_idle_energy_kwh_total"],
        sums["wattproxy_device_energy_kwh_total"],
        rel_tol=1e-9,
    )
    monitor = server.app[MONITORS]["cpu"]  # type: ignore[index]
    server.stop()  # the last reading is taken and every pending joule is committed
    assert math.isclose(answered_j + monitor.committed_idle_j, monitor.meter_delta_j, rel_tol=1e-9)
    if update_period_s:
        assert any(e["uncertainty_kwh"] > 0 for e in energies)
    if idle_policy == "amortize":
        assert any(e["idle_joules"] > 0 for e in energies)


def test_estimated_meter_is_labelled_estimated(make_server) -> None:  # type: ignore[no-untyped-def]
    server = make_server(meter="estimated")
    energies = _drive(server, chats=3, images=1, completions=1)
    assert all(e["measurement"] == "estimated" for e in energies)
    assert all(e["joules"] > 0 for e in energies)
