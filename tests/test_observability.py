"""Observability and deployment: /metrics (formats, exemplars, token, promtool lint), a real Prometheus
scraping a live WattProxy while both tasks serve several users, every Grafana panel query run through
Prometheus, the energy identity in PromQL, and the structure of the Grafana provisioning, the
dashboard, the compose file, deploy/prometheus.yml and the Dockerfile (hadolint)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
import yaml
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import ModelSettings
from tests.conftest import LiveServer, add_key, settings_for_tests
from tests.prom import Prometheus, find_binary, promtool, running_prometheus, scrape_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "grafana" / "dashboards" / "wattproxy.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources"
DASHBOARD_PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus.yml"

METRICS_TOKEN = "observability-test-token-0123456789"
# Sent as the OpenAI `user` field: free text from the request body, which must never become a label.
BODY_USERS = ("body-user-alice-3f9", "body-user-bob-7c1", "body-user-carol-b42", "body-user-dave-e05")
TRAFFIC_S = 10.0
SCRAPE_INTERVAL_S = 1.0

# Registered users (API keys); two have budgets, so the budget panel has data. The `user` label may
# only ever take these values.
KEY_USERS = {
    "alice": {"budget_kwh": 1.0, "budget_period": "day"},
    "bob": {"budget_co2_grams": 500.0},
    "carol": {},
}

# The catalogue of DESIGN.md, and the families added to it: family -> (type, labels).
CATALOGUE: dict[str, tuple[str, set[str]]] = {
    "wattproxy_requests": ("counter", {"model", "task", "user", "status"}),
    "wattproxy_energy_kwh": ("counter", {"model", "task", "user"}),
    "wattproxy_co2_grams": ("counter", {"model", "task", "user"}),
    "wattproxy_request_energy_kwh": ("histogram", {"model", "task"}),
    "wattproxy_request_co2_grams": ("histogram", {"model", "task"}),
    "wattproxy_device_energy_kwh": ("counter", {"device"}),
    "wattproxy_idle_energy_kwh": ("counter", {"device"}),
    "wattproxy_device_power_watts": ("gauge", {"device"}),
    "wattproxy_carbon_intensity_grams_per_kwh": ("gauge", {"zone", "source"}),
    "wattproxy_request_duration_seconds": ("histogram", {"model", "task"}),
    "wattproxy_queue_wait_seconds": ("histogram", {"model", "task"}),
    "wattproxy_batch_size": ("histogram", {"model"}),
    "wattproxy_queue_depth": ("gauge", {"model"}),
    "wattproxy_tokens": ("counter", {"model", "user", "kind"}),
    "wattproxy_images": ("counter", {"model", "user"}),
    "wattproxy_budget_remaining_kwh": ("gauge", {"user"}),
    "wattproxy_phone_charge_kwh": ("gauge", set()),  # the dashboard's smartphone-charge unit
    "wattproxy_open_connections": ("gauge", set()),
    "wattproxy_connections_refused": ("counter", {"reason"}),
    # models in processes of their own only (tiny-gpt2 here): none has died, the counts are 0
    "wattproxy_model_process_exits": ("counter", {"model", "reason"}),
}
# What issue 6 asks the dashboard to show, by the titles of the panels that show it.
REQUIRED_PANELS = {
    "Energy (kWh)", "CO2e (g)", "Power draw per device (W)", "Queue depth", "Carbon intensity (gCO2e/kWh)",
    "Per-request energy p50 / p95 by model (kWh)", "Energy per image (J) by model",
    "Energy per token (J) by model", "Idle share of device energy", "Top users by energy (kWh)",
    "Top users by CO2e (g)", "Remaining budgets (kWh)", "Requests and errors (req/s)", "Error ratio",
    "Latency p50 / p95 by model (s)", "Smartphone charges",
}  # fmt: skip
KWH_PER_SMARTPHONE_CHARGE = 0.02  # the server's phone_charge_kwh (0.012 by default): the panel follows it
SERIES_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count")

# Grafana unit ids used by dashboards like this one (grafana-data valueFormats/categories.ts), and the
# custom forms `suffix:<text>` / `prefix:<text>`.
GRAFANA_UNITS = {
    "none", "short", "percent", "percentunit", "watt", "kwatt", "mwatt", "watth", "kwatth", "mwatth",
    "joule", "massmg", "massg", "masskg", "masst", "s", "ms", "µs", "ns", "reqps", "ops", "cps",
}  # fmt: skip

# Grafana's values for the built-in interval variables, at the test's time scale.
BUILTINS = {"__rate_interval": "1m", "__range": "10m", "__interval": "15s", "__range_s": "600"}


def _binary(name: str) -> str:
    path = find_binary(name)
    if path is None:
        pytest.fail(f"{name} is not installed; `make test` installs it (.ci/deps-prometheus.sh)")
    return path


def _load_yaml_dir(directory: Path) -> list[dict[str, Any]]:
    files = sorted([*directory.glob("*.yml"), *directory.glob("*.yaml")])
    assert files, f"no provisioning file in {directory}"
    return [yaml.safe_load(f.read_text()) for f in files]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed children included."""
    out: list[dict[str, Any]] = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def _query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in _panels(dashboard) if p.get("type") != "row"]


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _substitute(expr: str, values: dict[str, str]) -> str:
    """Grafana's interpolation of `$name` and `${name}` (longest names first, so $__range_s wins)."""
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    leftover = re.findall(r"\$\{?\w+", expr)
    assert not leftover, f"unsubstituted variables {leftover} in {expr}"
    return expr


def _grafana_regex(values: list[str]) -> str:
    """A multi-value selection as Grafana's Prometheus datasource writes it: (a|b), regex-escaped, and
    with backslashes doubled for the PromQL string literal."""
    escaped = [re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", v) for v in values]
    return "(" + "|".join(escaped) + ")"


# -- live server, traffic and Prometheus (one of each for the module) ------------------------------------


@dataclass
class Traffic:
    request_ids: set[str] = field(default_factory=set)
    joules: float = 0.0
    answered: int = 0
    tasks: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = settings_for_tests(
        model_cache,
        tmp_path_factory.mktemp("observability"),
        metrics_token=METRICS_TOKEN,
        auth="keys",
        phone_charge_kwh=KWH_PER_SMARTPHONE_CHARGE,
        energy={"sample_period_s": 0.02, "max_finalize_delay_s": 0.5},
        models=[  # the chat model in a process of its own, as `wattproxy serve` runs models by default
            ModelSettings(
                name="tiny-gpt2",
                task="text",
                source="tiny:tiny-gpt2",
                max_tokens=64,
                max_n=4,
                own_process=True,
            ),
            ModelSettings(
                name="tiny-sd", task="image", source="tiny:tiny-sd", max_batch_size=4, max_steps=20
            ),
        ],
    )
    API_KEYS.extend(add_key(settings.db_url(), user, **budget) for user, budget in KEY_USERS.items())
    live = LiveServer(settings).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def prometheus(server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    config = scrape_config(
        f"127.0.0.1:{server.port}", scrape_interval_s=SCRAPE_INTERVAL_S, bearer_token=METRICS_TOKEN
    )
    with running_prometheus(_binary("prometheus"), tmp_path_factory.mktemp("prometheus"), config) as prom:
        prom.wait_scraped("wattproxy")
        yield prom


API_KEYS: list[str] = []


def _drive(server: LiveServer, duration_s: float) -> Traffic:
    """Waves of chat, completion and image requests from every key and body user, for `duration_s`."""
    clients = [
        openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0, timeout=60)
        for key in API_KEYS
    ]
    traffic = Traffic()

    def chat(i: int) -> tuple[str, dict[str, Any]]:
        raw = clients[i % len(clients)].chat.completions.with_raw_response.create(
            model="tiny-gpt2",
            messages=[{"role": "user", "content": "count to " * (1 + i % 4)}],
            max_tokens=2 + i % 5,
            temperature=0,
            user=BODY_USERS[i % len(BODY_USERS)],
        )
        return raw.headers["X-Request-Id"], raw.parse().usage.model_extra["energy"]  # type: ignore[union-attr,index]

    def completion(i: int) -> tuple[str, dict[str, Any]]:
        raw = clients[(i + 1) % len(clients)].completions.with_raw_response.create(
            model="tiny-gpt2", prompt=f"number {i}", max_tokens=3, temperature=0,
            user=BODY_USERS[(i + 1) % len(BODY_USERS)],
        )  # fmt: skip
        return raw.headers["X-Request-Id"], raw.parse().usage.model_extra["energy"]  # type: ignore[union-attr,index]

    def image(i: int) -> tuple[str, dict[str, Any]]:
        raw = clients[(i + 2) % len(clients)].images.with_raw_response.generate(
            model="tiny-sd", prompt=f"a lighthouse {i}", n=1 + i % 2, size="64x64",
            user=BODY_USERS[(i + 2) % len(BODY_USERS)], extra_body={"steps": 2},
        )  # fmt: skip
        return raw.headers["X-Request-Id"], raw.parse().usage.model_extra["energy"]  # type: ignore[union-attr,index]

    deadline = time.monotonic() + duration_s
    wave = 0
    with ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline or wave < 3:
            calls = [(chat, "text")] * 4 + [(completion, "text")] * 2 + [(image, "image")] * 2
            futures = [(pool.submit(fn, wave * 8 + k), task) for k, (fn, task) in enumerate(calls)]
            for future, task in futures:
                request_id, energy = future.result(timeout=120)
                traffic.request_ids.add(request_id)
                traffic.joules += energy["joules"]
                traffic.answered += 1
                traffic.tasks.add(task)
            wave += 1
    return traffic


def _get_metrics(server: LiveServer, accept: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    if accept:
        headers["Accept"] = accept
    r = requests.get(server.base_url + "/metrics", headers=headers, timeout=10)
    r.raise_for_status()
    return r


def _server_requests_total(server: LiveServer) -> float:
    families = text_string_to_metric_families(_get_metrics(server).text)
    return sum(s.value for f in families if f.name == "wattproxy_requests" for s in f.samples)


@dataclass
class Scraped:
    traffic: Traffic
    start: float  # Unix time before the traffic
    at: float  # Unix time at which Prometheus holds a scrape taken after the last answer


@pytest.fixture(scope="module")
def scraped(server: LiveServer, prometheus: Prometheus) -> Scraped:
    start = time.time()
    traffic = _drive(server, TRAFFIC_S)
    expected = _server_requests_total(server)
    assert expected >= traffic.answered
    at = prometheus.wait_for("sum(wattproxy_requests_total)", expected, timeout_s=30)
    return Scraped(traffic, start, at)


# -- /metrics itself -----------------------------------------------------------------------------------


def test_metrics_requires_the_bearer_token(server: LiveServer) -> None:
    url = server.base_url + "/metrics"
    for headers in ({}, {"Authorization": "Bearer wrong-token-0000000000"}, {"Authorization": METRICS_TOKEN}):
        r = requests.get(url, headers=headers, timeout=10)
        assert r.status_code == 401, headers
        assert r.json()["error"]["type"] == "authentication_error"
    assert _get_metrics(server).status_code == 200


def test_metrics_formats_catalogue_and_exemplars(server: LiveServer, scraped: Scraped) -> None:
    text = _get_metrics(server)
    assert text.headers["Content-Type"] == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(text.text)}
    for name, (kind, labels) in CATALOGUE.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, name
        assert families[name].samples, f"{name} has no samples after traffic"
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (sample.name, sample.labels)

    om = _get_metrics(server, accept="application/openmetrics-text; version=1.0.0")
    assert om.headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
    assert om.text.endswith("# EOF\n")
    exemplars = [
        s.exemplar
        for f in parse_openmetrics(om.text)
        if f.name == "wattproxy_request_energy_kwh"
        for s in f.samples
        if s.exemplar is not None
    ]
    assert exemplars, "no exemplar on wattproxy_request_energy_kwh"
    assert {e.labels["request_id"] for e in exemplars} <= scraped.traffic.request_ids
    assert all(set(e.labels) == {"request_id"} and e.value > 0 for e in exemplars)


def test_promtool_finds_nothing_wrong_in_live_metrics(server: LiveServer, scraped: Scraped) -> None:
    body = _get_metrics(server).content
    result = promtool(_binary("promtool"), "check", "metrics", stdin=body)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def test_body_user_field_never_becomes_a_label(
    server: LiveServer, scraped: Scraped, prometheus: Prometheus
) -> None:
    text = _get_metrics(server).text
    for user in BODY_USERS:
        assert user not in text
    users = {
        s.labels["user"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if "user" in s.labels
    }
    assert users == set(KEY_USERS)
    by_user = prometheus.query('count by (user) ({__name__=~"wattproxy_.+", user!=""})', scraped.at)
    assert {s["metric"]["user"] for s in by_user} == set(KEY_USERS)


# -- Prometheus: the identity and every dashboard panel ------------------------------------------------


def test_energy_identity_holds_in_promql(scraped: Scraped, prometheus: Prometheus) -> None:
    at = scraped.at
    attributed = prometheus.scalar("sum(wattproxy_energy_kwh_total)", at)
    idle = prometheus.scalar("sum(wattproxy_idle_energy_kwh_total)", at)
    device = prometheus.scalar("sum(wattproxy_device_energy_kwh_total)", at)
    assert attributed > 0 and idle > 0
    assert math.isclose(attributed + idle, device, rel_tol=1e-9)
    gap = prometheus.scalar(
        "abs(sum(wattproxy_energy_kwh_total) + sum(wattproxy_idle_energy_kwh_total)"
        " - sum(wattproxy_device_energy_kwh_total)) / sum(wattproxy_device_energy_kwh_total)",
        at,
    )
    assert gap < 1e-9
    # Everything the responses reported reached Prometheus, and nothing else was attributed.
    assert math.isclose(attributed * 3.6e6, scraped.traffic.joules, rel_tol=1e-9)
    assert prometheus.scalar("sum(wattproxy_request_energy_kwh_count)", at) == prometheus.scalar(
        "sum(wattproxy_requests_total)", at
    )
    assert {
        s["metric"]["task"] for s in prometheus.query("sum by (task) (wattproxy_energy_kwh_total)", at)
    } == {
        "text",
        "image",
    }
    stored = prometheus.exemplars("wattproxy_request_energy_kwh_bucket", scraped.start, scraped.at + 1)
    ids = {e["labels"]["request_id"] for series in stored for e in series["exemplars"]}
    assert ids and ids <= scraped.traffic.request_ids


def _variable_values(prometheus: Prometheus, variable: dict[str, Any]) -> list[str]:
    """Run a `label_values(metric, label)` variable query as Grafana does, through the labels API."""
    m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
    assert m, variable["definition"]
    return list(prometheus.api(f"label/{m.group(2)}/values", {"match[]": m.group(1)}))


def test_every_dashboard_panel_returns_data(scraped: Scraped, prometheus: Prometheus) -> None:
    dashboard = _dashboard()
    variables = _variables(dashboard)
    models = _variable_values(prometheus, variables["model"])
    users = _variable_values(prometheus, variables["user"])
    assert set(models) == {"tiny-gpt2", "tiny-sd"}
    assert users == sorted(KEY_USERS)
    selections = {
        "All": {"model": variables["model"]["allValue"], "user": variables["user"]["allValue"]},
        "every value ticked": {"model": _grafana_regex(models), "user": _grafana_regex(users)},
    }
    for selection, chosen in selections.items():
        values = {**BUILTINS, **chosen}
        for panel in _query_panels(dashboard):
            for t in panel["targets"]:
                found = prometheus.values(_substitute(t["expr"], values), scraped.at)
                assert found, f"{selection}: panel {panel['title']!r} target {t['refId']} returns no data"
                assert all(math.isfinite(v) for v in found), (selection, panel["title"], t["refId"], found)


def test_the_smartphone_panel_counts_in_the_servers_phone_charge_kwh(
    scraped: Scraped, prometheus: Prometheus
) -> None:
    dashboard = _dashboard()
    variables = _variables(dashboard)
    panel = next(p for p in _query_panels(dashboard) if p["title"] == "Smartphone charges")
    chosen = {"model": variables["model"]["allValue"], "user": variables["user"]["allValue"]}
    expr = _substitute(panel["targets"][0]["expr"], {**BUILTINS, **chosen})
    charges = prometheus.scalar(expr, scraped.at)
    kwh = prometheus.scalar(f"sum(increase(wattproxy_energy_kwh_total[{BUILTINS['__range']}]))", scraped.at)
    assert prometheus.scalar("wattproxy_phone_charge_kwh", scraped.at) == KWH_PER_SMARTPHONE_CHARGE
    assert kwh > 0 and math.isclose(charges, kwh / KWH_PER_SMARTPHONE_CHARGE, rel_tol=1e-9)


# -- files: provisioning, dashboard, compose, prometheus.yml, Dockerfile ---------------------------------


def _provisioned_datasources() -> dict[str, dict[str, Any]]:
    sources = [ds for doc in _load_yaml_dir(DATASOURCES) for ds in doc["datasources"]]
    return {ds["uid"]: ds for ds in sources}


def test_grafana_provisioning() -> None:
    for doc in _load_yaml_dir(DATASOURCES):
        assert doc["apiVersion"] == 1
    sources = _provisioned_datasources()
    assert sources["wattproxy-prometheus"]["type"] == "prometheus"
    assert sources["wattproxy-prometheus"]["url"] == "http://prometheus:9090"
    providers = [p for doc in _load_yaml_dir(DASHBOARD_PROVIDERS) for p in doc["providers"]]
    assert [p["type"] for p in providers] == ["file"]
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = dict(
        v.rsplit(":", 2)[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith(".")
    )
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"
    assert mounts["../grafana/dashboards"] == providers[0]["options"]["path"]
    for text in (DASHBOARD.read_text(), *(f.read_text() for f in DATASOURCES.iterdir())):
        assert "${DS_" not in text and "__inputs" not in text  # import-only inputs


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    sources = _provisioned_datasources()
    variables = _variables(dashboard)
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert variables["datasource"]["current"]["value"] in sources
    for name in ("model", "user"):
        assert variables[name]["type"] == "query"
        assert (
            variables[name]["includeAll"] and variables[name]["multi"] and variables[name]["allValue"] == ".*"
        )

    def resolve(ds: dict[str, Any]) -> dict[str, Any]:
        uid = ds["uid"]
        if uid in ("$datasource", "${datasource}"):
            uid = variables["datasource"]["current"]["value"]
        assert uid in sources, f"datasource uid {uid!r} is not provisioned"
        assert ds["type"] == sources[uid]["type"]
        return sources[uid]

    for name in ("model", "user"):
        resolve(variables[name]["datasource"])
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(i for i in ids if ids.count(i) > 1)}"
    assert dashboard["uid"] and dashboard["title"]
    catalogue = {family + suffix for family in CATALOGUE for suffix in SERIES_SUFFIXES}
    taken: set[tuple[int, int]] = set()
    titles = []
    for panel in _query_panels(dashboard):
        titles.append(panel["title"])
        resolve(panel["datasource"])
        units = [panel["fieldConfig"]["defaults"].get("unit", "none")]
        units += [
            prop["value"]
            for override in panel["fieldConfig"].get("overrides", [])
            for prop in override.get("properties", [])
            if prop["id"] == "unit"
        ]
        for unit in units:
            assert unit in GRAFANA_UNITS or unit.startswith(("suffix:", "prefix:")), (panel["title"], unit)
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            resolve(target["datasource"])
            names = set(re.findall(r"\bwattproxy_\w+", target["expr"]))
            assert names and names <= catalogue, (panel["title"], names - catalogue)
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & taken, f"panel {panel['title']!r} overlaps another"
        taken |= cells
    assert len(titles) == len(set(titles))
    assert set(titles) >= REQUIRED_PANELS, sorted(REQUIRED_PANELS - set(titles))
    by_title = {p["title"]: p for p in _query_panels(dashboard)}
    power, queue = by_title["Power draw per device (W)"]["gridPos"], by_title["Queue depth"]["gridPos"]
    assert power["y"] == queue["y"] and power["x"] + power["w"] == queue["x"], "power beside queue depth"
    charges = by_title["Smartphone charges"]["targets"][0]["expr"]
    assert charges.endswith("/ scalar(max(wattproxy_phone_charge_kwh))"), charges


def test_compose_file() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) >= {"wattproxy", "prometheus", "grafana"}
    app = services["wattproxy"]
    assert (COMPOSE.parent / app["build"]["context"] / app["build"].get("dockerfile", "Dockerfile")).is_file()
    devices = app["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "--enable-feature=exemplar-storage" in services["prometheus"]["command"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{source} does not exist"
    prom_mounts = [v for v in services["prometheus"]["volumes"] if v.startswith("./prometheus.yml:")]
    assert prom_mounts == ["./prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


def test_deploy_prometheus_config() -> None:
    result = promtool(_binary("promtool"), "check", "config", str(PROMETHEUS_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "wattproxy")
    assert job["static_configs"][0]["targets"] == ["wattproxy:8080"]


def test_dockerfile_is_hadolint_clean_and_healthy() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: it comes with the test extra (pip install -e '.[test]')")
    dockerfile = ROOT / "Dockerfile"
    result = subprocess.run(
        [hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [
        ln.strip() for ln in dockerfile.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    base = next(ln.split()[1] for ln in lines if ln.startswith("ARG BASE_IMAGE="))
    assert "cuda" in base.lower()
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(ln.startswith("HEALTHCHECK") for ln in lines) and "/readyz" in dockerfile.read_text()
    assert "EXPOSE 8080" in lines
    assert 'CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]' in lines
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
