"""proxy/exposition.py against prometheus_client's own encoders: for the app's catalogue (the `Metrics`
families and the scrape collector, several users x models, awkward label values) and for registries full
of special values and metric kinds, the rendered bytes are identical to `generate_latest`'s (text 0.0.4
and OpenMetrics 1.0, with and without `_created` series), and so are the parsed families. Speed is
measured by bench/metrics_render.py, never asserted here."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    disable_created_metrics,
    enable_created_metrics,
)
from prometheus_client import metrics as prom_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    StateSetMetricFamily,
    SummaryMetricFamily,
    UnknownMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS_CONTENT_TYPE
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from bench import metrics_render
from bench.common import read_status
from proxy.errors import error_middleware
from proxy.exposition import Exposition, RowFamily, go_float
from proxy.metrics import EnergyBook, EnergyEntry, Metrics, RequestStats, metrics_handler

# Label values that need escaping (quote, backslash, newline), that look like syntax, or are not ASCII.
AWKWARD = ['quo"te', "back\\slash", "new\nline", 'all\\"\n"\\', "ünï-用户-🔋", "", "a,b=c}{", "# EOF", " sp "]
SPECIAL_FLOATS = (
    0.0, -0.0, 1.0, -1.0, 0.1, 1 / 3, 2.5e-05, 999_999.0, 999_999.999_999_9, 1e6, 1_000_000.5, 1234567.0,
    123_456_789.123, 1e15, 9_999_999_999_999_998.0, 1e16, 1.5e16, 1e22, 1.7976931348623157e308, 1e-300,
    5e-324, -1e6, -1234567.0, -1e300, math.inf, -math.inf, math.nan, 1.732612345123456e9,
)  # fmt: skip


@pytest.fixture(params=[False, True], ids=["no-created", "created"])
def created(request: pytest.FixtureRequest) -> Iterator[bool]:
    """prometheus_client's process-wide `_created` switch (`wattproxy serve` turns it off); restored."""
    before = prom_metrics._use_created
    (enable_created_metrics if request.param else disable_created_metrics)()
    yield request.param
    (enable_created_metrics if before else disable_created_metrics)()


def app_registry(users: int = 12, extra_users: Iterable[str] = AWKWARD) -> CollectorRegistry:
    """The app's catalogue as the app fills it: `observe_request` / `observe_batch`, committed energy in
    the book, and the scrape collector with power (one device unread), queue depths, carbon intensity
    and budgets. Three models (two text, one image), one of them with an awkward name."""
    registry = CollectorRegistry()
    book = EnergyBook()
    metrics = Metrics(registry, book)
    models = [("tiny-gpt2", "text", "cuda:0"), ("tiny-sd", "image", "cuda:1"), ('odd "m"\\1', "text", "cpu")]
    names = [f"user-{u:03d}" for u in range(users)] + list(extra_users)
    for m, (model, task, device) in enumerate(models):
        book.add_device(device)
        entries = []
        for n, user in enumerate(names):
            for k in range(1 + n % 3):
                status = ("ok", "ok", "error", "cancelled")[(n + k + m) % 4]
                kwh = (1 + n + 7 * k) * 1.37e-7 * (m + 1)
                metrics.observe_request(
                    RequestStats(
                        model=model,
                        task=task,
                        user=user,
                        status=status,
                        request_id=f"{m:02d}{n:04d}{k:02d}" + "ab" * 12,
                        energy_kwh=kwh,
                        co2_grams=None if status == "error" else kwh * 381.0,
                        queue_wait_s=0.0013 * (n % 11),
                        duration_s=0.021 * (1 + n % 13),
                        prompt_tokens=5 + n,
                        completion_tokens=3 * k + n % 4,
                        images=0 if task == "text" else 1 + k,
                    )
                )
                entries.append(EnergyEntry(model, task, user, kwh * 3.6e6, kwh * 381.0))
            metrics.observe_batch(model, 1 + n % 9)
        book.commit(device, idle_j=12.5 * (m + 1), entries=entries)
    metrics.attach(
        power=lambda: {"cuda:0": 312.25, "cuda:1": None, "cpu": 41.0},
        queue_depths=lambda: {"tiny-gpt2": 3, "tiny-sd": 0, 'odd "m"\\1': 12},
        intensity=lambda: ("DE", "static", 381.0),
        budgets=lambda: {"user-001": 0.75, 'quo"te': -0.0, "user-002": 1234567.0},
        phone_charge_kwh=0.012,  # a family without labels
    )
    return registry


def _sample(s: Any) -> tuple[Any, ...]:
    ex = s.exemplar
    exemplar = None if ex is None else (sorted(ex.labels.items()), repr(float(ex.value)), ex.timestamp)
    # repr: NaN equals NaN, and -0.0 differs from 0.0
    return (s.name, sorted(s.labels.items()), repr(float(s.value)), s.timestamp, exemplar)


def parsed(families: Iterable[Metric]) -> list[tuple[Any, ...]]:
    """Families as comparable values: name, type, help, unit and every sample with its exemplar."""
    return [(f.name, f.type, f.documentation, f.unit, [_sample(s) for s in f.samples]) for f in families]


def assert_same(registry: CollectorRegistry, exposition: Exposition, *, parse_om: bool = True) -> None:
    """Both formats: identical bytes, and the same families when each output is parsed."""
    text, expected_text = exposition.text(), generate_latest(registry)
    assert text.decode() == expected_text.decode()
    assert parsed(parse_text(text.decode())) == parsed(parse_text(expected_text.decode()))
    om, expected_om = exposition.openmetrics(), generate_openmetrics(registry)
    assert om.decode() == expected_om.decode()
    if parse_om:
        assert parsed(parse_openmetrics(om.decode())) == parsed(parse_openmetrics(expected_om.decode()))


# -- the app's catalogue --------------------------------------------------------------------------------


def test_app_catalogue_renders_exactly_as_prometheus_client(created: bool) -> None:
    registry = app_registry()
    exposition = Exposition(registry)
    assert_same(registry, exposition)
    assert_same(registry, exposition)  # second scrape: from the label caches

    families = {f.name: f for f in parse_openmetrics(exposition.openmetrics().decode())}
    users = {s.labels["user"] for s in families["wattproxy_energy_kwh"].samples}
    assert set(AWKWARD) <= users, "awkward user names must survive escaping and parsing"
    exemplars = [s.exemplar for s in families["wattproxy_request_energy_kwh"].samples if s.exemplar]
    assert exemplars and all(set(e.labels) == {"request_id"} for e in exemplars)
    created_series = [s for f in families.values() for s in f.samples if s.name.endswith("_created")]
    assert bool(created_series) == created


def test_app_catalogue_takes_the_fast_path_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every family of the app is rendered by proxy/exposition.py itself, none by prometheus_client."""

    def fallback(metrics: Any, om: bool) -> str:
        raise AssertionError(f"prometheus_client's encoder used for {[m.name for m in metrics]}")

    registry = app_registry(users=3)
    monkeypatch.setattr(Exposition, "_fallback", staticmethod(fallback))
    exposition = Exposition(registry)
    exposition.text()
    exposition.openmetrics()


def test_scrape_collector_rows_and_families_agree() -> None:
    """`collect()` (prometheus_client's view) is built from `collect_rows()` (the fast renderer's)."""
    registry = app_registry(users=2)
    (collector,) = [c for c in registry._collector_to_names if hasattr(c, "collect_rows")]
    rows = list(collector.collect_rows())
    families = list(collector.collect())
    assert [f.name for f in families] == [r.name for r in rows]
    assert [f.name for f in families] == [
        "wattproxy_energy_kwh", "wattproxy_co2_grams", "wattproxy_device_energy_kwh",
        "wattproxy_idle_energy_kwh", "wattproxy_device_power_watts", "wattproxy_queue_depth",
        "wattproxy_carbon_intensity_grams_per_kwh", "wattproxy_budget_remaining_kwh",
        "wattproxy_phone_charge_kwh",
    ]  # fmt: skip
    for family, row in zip(families, rows, strict=True):
        assert family.type == row.type and family.documentation == row.documentation
        assert [(s.labels, s.value) for s in family.samples] == [
            (dict(zip(row.labelnames, values, strict=True)), value) for values, value in row.rows
        ]


def test_bench_registry_renders_exactly(created: bool) -> None:
    registry = metrics_render.populate(users=25, models=4)
    assert_same(registry, Exposition(registry))


def test_renders_follow_changes_between_scrapes(created: bool) -> None:
    """The label caches never serve a stale series: new children, new values, removed and cleared
    children, registered and unregistered collectors."""
    registry = app_registry(users=4, extra_users=())
    exposition = Exposition(registry)
    assert_same(registry, exposition)
    extra = Counter("wattproxy_test_extra", "Registered after the first scrape", ["user"], registry=registry)
    requests = cast(Counter, registry._names_to_collectors["wattproxy_requests"])
    for n, user in enumerate(AWKWARD):
        extra.labels(user).inc(n)
        requests.labels("tiny-gpt2", "text", user, "ok").inc(2.5)
    requests.labels("tiny-gpt2", "text", "user-000", "ok").inc(40)
    assert_same(registry, exposition)
    requests.remove("tiny-gpt2", "text", "user-001", "ok")
    extra.clear()
    assert_same(registry, exposition)
    registry.unregister(extra)
    assert_same(registry, exposition)
    for n in range(300):  # far more removed children than live ones: the cache is rebuilt, still exact
        extra.labels(f"gone-{n}")
        requests.labels("tiny-sd", "image", f"gone-{n}", "ok").inc()
        requests.remove("tiny-sd", "image", f"gone-{n}", "ok")
        assert n % 100 or exposition.text() == generate_latest(registry)
    assert_same(registry, exposition)


# -- special values and every kind of metric ----------------------------------------------------------------


class _Rows:
    """A RowCollector of special values: one plain family and one whose name needs escaping."""

    def collect_rows(self) -> Iterator[RowFamily]:
        values = [(AWKWARD[i % len(AWKWARD)], f"{i}") for i in range(len(SPECIAL_FLOATS))]
        rows = [(labels, v) for labels, v in zip(values, SPECIAL_FLOATS, strict=True)]
        yield RowFamily("rows_special", "gauge", 'Rows "help" \\ with\nnewline', ("who", "i"), rows)
        yield RowFamily(
            "rows_ints", "counter", "Integer values", ("n",), [((str(n),), n) for n in (0, 3, 10**7)]
        )
        yield RowFamily("rows_empty", "counter", "No rows yet", ("n",), [])
        yield RowFamily("rows:colon", "gauge", "Needs escaping", ("a",), [(("x",), 1.0)])
        yield RowFamily("rows_dotted_label", "gauge", "Needs quoting", ("a.b",), [(("x",), 2.0)])

    def collect(self) -> Iterator[Metric]:
        return (family.to_metric() for family in self.collect_rows())


class _Families:
    """A plain collector of every metric family kind, with timestamps, created and exemplars."""

    def collect(self) -> Iterator[Metric]:
        summary = SummaryMetricFamily("fam_summary", "A summary", labels=["who"])
        summary.add_metric(['quo"te'], count_value=3, sum_value=1e7, timestamp=1_700_000_000.25)
        yield summary
        yield InfoMetricFamily("fam_build", "Build info", value={"version": "1.2\n3", "rev": 'a"b'})
        yield StateSetMetricFamily("fam_state", "A state set", value={"up": True, "down": False})
        gh = GaugeHistogramMetricFamily("fam_gh", "A gauge histogram", labels=["who"])
        gh.add_metric(["x"], buckets=[("1.0", 4.0), ("+Inf", 5.0)], gsum_value=7.5)
        yield gh
        yield UnknownMetricFamily("fam_unknown", "Unknown\\type", value=math.nan)
        counter = CounterMetricFamily("fam_counter", "With created", labels=["who"], created=1.5e9)
        counter.add_metric(["y"], 4.0, created=1_700_000_001.0, timestamp=1_700_000_002)
        yield counter
        ex = CounterMetricFamily("fam_ex", "With an exemplar", labels=["who"])
        ex.add_metric(["z"], 2.0)
        ex.samples[0] = ex.samples[0]._replace(exemplar=Exemplar({"trace": 'q"\\'}, 2.0, 1_700_000_003.5))
        yield ex
        yield GaugeMetricFamily("fam_gauge", "A gauge with a unit", value=-0.0, unit="seconds")


def special_registry() -> CollectorRegistry:
    """Every value of SPECIAL_FLOATS through counters, gauges and histograms, awkward label values and
    help texts, exemplars, target_info, label-less and empty families, and the kinds with no fast path."""
    registry = CollectorRegistry(target_info={"service": 'watt"proxy', "zone": "de\\1\n"})
    doc = 'Help with \\ backslash, "quotes" and\nnewline'
    counter = Counter("sp_events", doc, ["kind", "who"], registry=registry)
    for i, v in enumerate(SPECIAL_FLOATS):
        if not v < 0:  # counters refuse negative increments (NaN passes)
            counter.labels("inc", AWKWARD[i % len(AWKWARD)] + str(i)).inc(v)
    counter.labels("exemplar", "x").inc(2, exemplar={"trace_id": 'a"b\\c\nd', "span": "ü"})
    reset = counter.labels("reset", "x")
    reset.inc(5)
    reset.reset()  # stores the int 0, then int increments keep it an int
    reset.inc(3)
    Counter("sp_empty", "Labelled, no children yet", ["who"], registry=registry)
    Counter("sp_plain", "No labels", registry=registry).inc(1e7)
    gauge = Gauge("sp_level", doc, ["who"], registry=registry, unit="watts")
    for i, v in enumerate(SPECIAL_FLOATS):
        gauge.labels(f"{AWKWARD[i % len(AWKWARD)]}-{i}").set(v)
    gauge.labels("function").set_function(lambda: 42)
    Gauge("sp_plain_gauge", "No labels", registry=registry).set(-1234567.0)
    hist = Histogram(
        "sp_sizes", doc, ["who"], buckets=(1e-9, 0.5, 1e6, 2.5e7, 1e16, math.inf), registry=registry
    )
    for i, v in enumerate(SPECIAL_FLOATS):
        hist.labels(AWKWARD[i % len(AWKWARD)]).observe(v, exemplar={"request_id": f"r{i}\n\\"})
    negative = Histogram(
        "sp_deltas", "First bucket below zero: no _sum", buckets=(-5.0, 0.0, 5.0), registry=registry
    )
    for v in (-10.0, -1.0, 3.0, 99.0):
        negative.observe(v)
    Histogram("sp_empty_hist", "Labelled, no children", ["who"], registry=registry)
    Summary("sp_latency", "A summary wrapper", ["who"], registry=registry).labels("x").observe(0.25)
    Info("sp_build", "Info wrapper", registry=registry).info({"version": "1.0"})
    Enum("sp_state", "Enum wrapper", states=["a", "b"], registry=registry).state("b")
    Counter("sp:colon", "Name with a colon", ["who"], registry=registry).labels("x").inc()
    Gauge("sp_dotted_label", "UTF-8 label name", ["a.b"], registry=registry).labels("x").set(1)
    registry.register(_Rows())
    registry.register(_Families())
    return registry


def test_special_values_kinds_and_escaping_render_exactly(created: bool) -> None:
    registry = special_registry()
    exposition = Exposition(registry)
    # prometheus_client's OpenMetrics parser refuses some of what its encoder writes (a NaN counter, ...):
    # the bytes are compared, and the text parser reads everything.
    assert_same(registry, exposition, parse_om=False)
    assert_same(registry, exposition, parse_om=False)


@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**20), 10**20))
def test_go_float_is_float_to_go_string(value: float) -> None:
    assert go_float(value) == floatToGoString(value)


@pytest.mark.parametrize("value", [*SPECIAL_FLOATS, 0, 7, -3, 10**6, 10**17, True])
def test_go_float_edges(value: float) -> None:
    assert go_float(value) == floatToGoString(value)


def test_row_family_is_validated() -> None:
    with pytest.raises(ValueError, match="_total"):
        RowFamily("x_total", "counter", "doc", (), [])
    with pytest.raises(ValueError, match="counter or gauge"):
        RowFamily("x", "histogram", "doc", (), [])  # type: ignore[arg-type]


# -- the handler --------------------------------------------------------------------------------------------


async def test_handler_negotiates_the_format_and_checks_the_token(aiohttp_client: Any) -> None:
    registry = app_registry(users=3)
    app = web.Application(middlewares=[error_middleware(lambda request: None, 1 << 20)])
    app.router.add_get("/metrics", metrics_handler(registry, "metrics-token-0123"))
    client = await aiohttp_client(app)
    auth = {"Authorization": "Bearer metrics-token-0123"}

    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "metrics-token-0123"}):
        r = await client.get("/metrics", headers=headers)
        assert r.status == 401
        assert (await r.json())["error"]["type"] == "authentication_error"

    r = await client.get("/metrics", headers=auth)
    assert r.status == 200 and r.headers["Content-Type"] == CONTENT_TYPE_LATEST
    assert await r.read() == generate_latest(registry)

    accept = "application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
    r = await client.get("/metrics", headers={**auth, "Accept": accept})
    assert r.status == 200 and r.headers["Content-Type"] == OPENMETRICS_CONTENT_TYPE
    assert await r.read() == generate_openmetrics(registry)


def test_bench_smoke(tmp_path: Path) -> None:
    assert metrics_render.main(["--smoke", "--out", str(tmp_path)]) == 0
    markdown = (tmp_path / "metrics_render.md").read_text(encoding="utf-8")
    assert read_status(markdown, "metrics_render") == "smoke"
    assert "generate_latest" in markdown and "Exposition" in markdown


def test_fast_histogram_observation_equals_observe(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Metrics` updates its values directly under one shared lock (`_observe_shared`, and `_observe`
    for what that leaves out); a registry fed the same requests through prometheus_client's own
    `Histogram.observe` and `Counter.inc` exposes the same bytes (exemplars included, timestamps
    aside)."""
    import re

    import proxy.metrics as metrics_module

    values = [0.0, 1e-9, 2.5e-6, 2.5e-6 * (1 + 1e-15), 0.01, 7.0, 1e9, -1.0, math.nan, math.inf]

    def feed() -> CollectorRegistry:
        registry = CollectorRegistry()
        m = Metrics(registry, EnergyBook())
        for i, v in enumerate(values):
            for size in (1, 3, 8):
                m.observe_batch("tiny-sd", size)
            m.observe_request(
                RequestStats(
                    model="tiny-sd",
                    task="image",
                    user="u",
                    status="ok",
                    request_id="r" * (i * 12),  # up to 108 characters: the long ones take `observe`
                    energy_kwh=v,
                    co2_grams=v if i % 2 else None,
                    queue_wait_s=v,
                    duration_s=abs(v),
                    images=1,
                ),
                batch_size=300,  # the batch observed with its first member, as the app's recorder does
            )
            m.observe_request(
                RequestStats(
                    model="tiny-gpt2",
                    task="text",
                    user="u",
                    status="ok" if i % 3 else "error",
                    request_id=f"t{i}",
                    energy_kwh=v,
                    co2_grams=v,
                    queue_wait_s=abs(v),
                    duration_s=v,
                    prompt_tokens=i,
                    completion_tokens=2 * i,
                )
            )
        return registry

    fast = feed()
    monkeypatch.setattr(
        metrics_module,
        "_observe",
        lambda child, amount, request_id=None: child.observe(
            amount, exemplar={"request_id": request_id} if request_id is not None else None
        ),
    )
    monkeypatch.setattr(metrics_module._Shared, "usable", staticmethod(lambda children: False))
    reference = feed()
    created = re.compile(rb"^\S+_created[{ ].*\n", re.MULTILINE)  # when each registry was built
    stamp = re.compile(rb"(# \{request_id=\"[^\"]*\"\} \S+) \d+\.\d+")  # when each exemplar was seen

    def normal(text: bytes) -> bytes:
        return stamp.sub(rb"\1", created.sub(b"", text))

    assert normal(generate_latest(fast)) == normal(generate_latest(reference))
    assert normal(generate_openmetrics(fast)) == normal(generate_openmetrics(reference))
    assert b"request_id" in generate_openmetrics(fast)


def test_request_metric_values_share_the_lock_the_direct_updates_take() -> None:
    """`Metrics` writes a request's values directly under its own lock (`proxy.metrics._Shared`); that is
    atomic only if every other reader and writer (`get`, `inc`, `observe`, the exposition) takes the
    same lock, i.e. if every value of the request and batch metrics was re-pointed at it."""
    registry = CollectorRegistry()
    m = Metrics(registry, EnergyBook())
    for task, status in (("text", "ok"), ("image", "error")):
        m.observe_request(
            RequestStats(
                model="tiny",
                task=task,
                user="u",
                status=status,
                request_id="r",
                energy_kwh=1e-6,
                co2_grams=1e-4,
                queue_wait_s=0.001,
                duration_s=0.01,
                prompt_tokens=3,
                completion_tokens=5,
                images=1,
            )
        )
    m.observe_batch("tiny", 4)
    metrics = (m.requests, m.request_energy, m.request_co2, m.request_duration, m.queue_wait, m.batch_size)
    children = [c for metric in (*metrics, m.tokens, m.images) for c in metric._metrics.values()]
    values = [v for c in children for v in ([c._sum, *c._buckets] if hasattr(c, "_buckets") else [c._value])]
    assert len(children) == 2 + 2 * 4 + 1 + 2 + 1  # requests, 4 histograms x 2 tasks, batch, tokens, images
    assert values and all(v._lock is m._lock for v in values)
