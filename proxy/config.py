"""Settings: TOML file < `WATTPROXY_*` environment < command-line flags. The only module that reads the
environment. Defaults serve the embedded random-weight models on a CPU."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy.carbon import CarbonSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "WATTPROXY_"
log = logging.getLogger(__name__)
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
# The request body limit in proxy mode where none is set: a vision model's chat carries its images in
# base64 (OpenAI takes images up to 20 MB); in process, 1 MiB holds any prompt a model there takes.
PROXY_MAX_BODY_BYTES = 20 << 20


class ConfigError(ValueError):
    """Invalid configuration; the message says which setting and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def parse_size(size: str) -> tuple[int, int]:
    """'512x384' -> (width, height). Raises ValueError for anything else."""
    m = SIZE_RE.match(size)
    if not m:
        raise ValueError(f"size must look like 'WIDTHxHEIGHT' (e.g. '512x512'), not {size!r}")
    return int(m.group(1)), int(m.group(2))


class ModelSettings(_Strict):
    """One served model. `source` is a hub name, a local directory, or `tiny:PRESET` (built locally)."""

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/-]+$")
    task: Literal["text", "image"]
    source: str
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_batch_size: int = Field(8, ge=1, le=256)
    max_wait_ms: float = Field(10.0, ge=0, le=10_000)
    max_queue: int = Field(64, ge=1, le=100_000)
    # At most this many of one user's requests (choices) queued for the model at once: one key cannot
    # fill the queue that every user shares. None: no cap of its own (max_queue only).
    max_queue_per_user: int | None = Field(None, ge=1, le=100_000)
    # Which queued requests make the next batch when more wait than it holds. "fair": users in turn,
    # the user served longest ago first (each user's requests in arrival order), so one user's backlog
    # holds another's request back one batch at most; with one user it is arrival order. "arrival":
    # first come, first served across users.
    batch_order: Literal["fair", "arrival"] = "fair"
    # Run the model in a process of its own, whose Python does not share the server's interpreter
    # lock (backends/process.py): the server's request handling then does not slow the model down.
    # false: in the server's process (a few seconds less to start, one CUDA context for all models).
    own_process: bool = True
    # Images on a CUDA device: replay each denoising step as a CUDA graph (backends/cuda_graphs.py), one
    # launch in place of about a thousand, so that the host's kernel launching no longer sets the pace of
    # a small batch. The first request of each size and batch captures its graph (a few steps' time and
    # that shape's activation memory, kept for the last 4 shapes).
    cuda_graphs: bool = False
    # A model process (own_process) that runs one batch longer than this is taken as hung (a deadlock,
    # a kernel that never returns): it is killed, the batch fails (its requests answered 500 and
    # recorded as errors, charged what the device drew meanwhile) and a new process starts at the next
    # batch. Set it well above the longest batch the model's limits allow. None: no limit.
    batch_timeout_s: float | None = Field(None, gt=0)
    # Before the model takes requests, one small request (a 1-token completion; an image of the default
    # size, 1 step) runs on its device's thread, charged to nobody (its energy is idle), so that the
    # first client does not pay the device's and the libraries' first-call costs (a CUDA context's
    # kernels, cuBLAS's handles, with cuda_graphs the graph of a batch of 1). "auto": on CUDA devices.
    warmup: bool | Literal["auto"] = "auto"
    # The call format the model was trained on, for `tool_choice: "auto"` (and tools with no tool_choice,
    # which OpenAI's API takes as "auto"): hermes (Hermes, Qwen 2.5 and 3), llama3_json (Llama 3.1-3.3),
    # mistral (proxy/tool_calls.py). None: "auto" is refused with a 400 (required and named calls are
    # held to the tools' schemas and need no parser).
    tool_call_parser: Literal["hermes", "llama3_json", "mistral"] | None = None
    # text limits
    max_tokens: int = Field(256, ge=1)  # upper bound on max_tokens a request may ask for
    # max_tokens of a request that sends none. None, as OpenAI's API: a chat goes on to its end of
    # sequence, `max_tokens` or the context, whichever comes first; a completion gets 16 (OpenAI's and
    # vLLM's default for the legacy endpoint). A default is capped at what the context leaves.
    default_max_tokens: int | None = Field(None, ge=1)
    # Streamed pieces go from the model's thread to the event loop after each decoding step, but not
    # more often than this: faster steps (a small model on a CPU) are handed over a few at a time, and
    # a stream writes them in one go. 0: every step on its own. Steps slower than this are unaffected.
    stream_interval_ms: float = Field(2.0, ge=0, le=1000)
    max_prompt_tokens: int = Field(1024, ge=1)
    # image limits
    sizes: list[str] = Field(default_factory=lambda: ["64x64", "128x128", "256x256"])
    default_size: str = "64x64"
    max_n: int = Field(4, ge=1, le=64)
    default_steps: int = Field(4, ge=1)
    max_steps: int = Field(50, ge=1)
    default_guidance_scale: float = Field(7.5, ge=0)
    max_prompt_chars: int = Field(4000, ge=1)

    @field_validator("sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            w, h = parse_size(size)
            if w % 8 or h % 8 or w <= 0 or h <= 0:
                raise ValueError(f"size {size!r}: width and height must be positive multiples of 8")
        return sizes

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> ModelSettings:
        if self.task == "image" and self.default_size not in self.sizes:
            raise ValueError(f"default_size {self.default_size!r} is not in sizes {self.sizes}")
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens:
            raise ValueError("default_max_tokens exceeds max_tokens")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps exceeds max_steps")
        if self.tool_call_parser is not None and self.task != "text":
            raise ValueError("tool_call_parser is for text models")
        if self.cuda_graphs and self.task != "image":
            raise ValueError("cuda_graphs is for image models")
        if self.cuda_graphs and not self.device.startswith("cuda"):
            raise ValueError(f"cuda_graphs needs a CUDA device, not {self.device!r}")
        if self.batch_timeout_s is not None and not self.own_process:
            raise ValueError(
                "batch_timeout_s needs own_process = true (a model in the server's process cannot be stopped)"
            )
        return self


def embedded_models() -> list[ModelSettings]:
    """The embedded default: small random-weight models of real architectures, built locally."""
    return [
        ModelSettings(name="tiny-gpt2", task="text", source="tiny:tiny-gpt2"),
        ModelSettings(name="tiny-sd", task="image", source="tiny:tiny-sd", max_batch_size=4),
    ]


class EnergySettings(_Strict):
    """How energy is measured and attributed. Units in the names."""

    sample_period_s: float = Field(0.05, gt=0, le=10)
    finalize_poll_s: float = Field(0.005, gt=0, le=10)
    max_finalize_delay_s: float = Field(1.0, gt=0, le=60)
    nvml_step_hint_s: float = Field(0.1, gt=0)
    synthetic_idle_watts: float = Field(50.0, ge=0)
    synthetic_busy_watts: float = Field(300.0, ge=0)
    synthetic_update_period_s: float = Field(0.0, ge=0)
    estimated_watts_per_core: float = Field(10.0, ge=0)
    estimated_idle_watts: float = Field(0.0, ge=0)


class UpstreamModelSettings(_Strict):
    """A model the upstream serves, listed explicitly (then the upstream's /v1/models is not asked)."""

    name: str = Field(min_length=1, max_length=256)
    task: Literal["text", "image"] = "text"


class UpstreamSettings(_Strict):
    """Proxy mode: an OpenAI-compatible server (vLLM, TGI, ...) on this host runs the models; WattProxy
    forwards requests to it and meters the GPUs it runs on (`devices`, CUDA indices). Units in names."""

    url: str = Field(pattern=r"^https?://[^\s/]+(/\S*)?$")  # base URL, with or without the trailing /v1
    api_key: SecretStr | None = None  # sent to the upstream as `Authorization: Bearer <api_key>`
    devices: list[int] = Field(default_factory=lambda: [0], min_length=1)
    models: list[UpstreamModelSettings] = Field(default_factory=list)  # empty: discovered at start
    models_refresh_s: float = Field(30.0, gt=0)  # discovered models: the upstream's list asked again
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(300.0, gt=0)  # longest wait for the next byte of an answer
    max_connections: int = Field(256, ge=1, le=100_000)
    keepalive_timeout_s: float = Field(4.0, gt=0)  # below vLLM's 5 s, so no request meets a closing socket
    # Token estimates where the upstream reports no usage (and for the pieces of a stream): a local
    # tokenizer directory, a hub name already in the cache, or `tiny:PRESET`; unset: ~4 characters/token.
    tokenizer: str | None = None
    split_interval_s: float = Field(0.1, gt=0, le=10)  # a stream's accounting piece, at least this long

    @field_validator("devices", mode="before")
    @classmethod
    def _device_list(cls, value: Any) -> Any:
        if isinstance(value, str):  # "0,1" from the environment or a flag
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("devices")
    @classmethod
    def _devices_valid(cls, devices: list[int]) -> list[int]:
        if any(d < 0 for d in devices) or len(set(devices)) != len(devices):
            raise ValueError(f"devices must be distinct CUDA indices >= 0, not {devices}")
        return devices

    def device_names(self) -> list[str]:
        """The metered devices, e.g. ["cuda:0", "cuda:1"]."""
        return [f"cuda:{d}" for d in self.devices]


class Settings(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    models: list[ModelSettings] = Field(default_factory=embedded_models)
    upstream: UpstreamSettings | None = None  # proxy mode; then `models` defaults to none
    cache_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_cache_dir("wattproxy")))
    data_dir: Path = Field(default_factory=lambda: Path(platformdirs.user_data_dir("wattproxy")))
    meter: Literal["auto", "nvml", "estimated", "synthetic"] = "auto"
    idle_policy: Literal["separate", "amortize"] = "separate"
    # amortize: idle energy is charged to the next job's requests only within this window; older idle
    # energy (a quiet night) is reported as idle
    amortize_window_s: float = Field(60.0, gt=0)
    energy: EnergySettings = Field(default_factory=EnergySettings)
    carbon: CarbonSettings = Field(default_factory=CarbonSettings)
    auth: Literal["keys", "none"] = "keys"
    # Ledger database URL: sqlite:///path.db (default: wattproxy.db in data_dir) or postgresql://...
    db: str | None = None
    # A SQLite ledger: a record made while no other request is in flight is committed on the event
    # loop's thread (durably, as ever), sparing one client's round trip two thread hand-overs.
    ledger_inline_commit: bool = True
    key_cache_ttl_s: float = Field(1.0, ge=0, le=60)
    budget_refresh_s: float = Field(5.0, gt=0)
    phone_charge_kwh: float = Field(0.012, gt=0)
    # When set, GET /metrics requires `Authorization: Bearer <metrics_token>` (WATTPROXY_METRICS_TOKEN).
    metrics_token: str | None = Field(None, min_length=16)
    max_body_bytes: int = Field(1 << 20, ge=1024)  # in proxy mode PROXY_MAX_BODY_BYTES unless set
    max_header_bytes: int = Field(8190, ge=1024, le=1 << 20)  # one request line or header field
    # A client must send its body, and read each streamed event, within this time (slow clients).
    client_timeout_s: float = Field(60.0, gt=0)
    # A connection with no request in progress is closed after this long: an idle keep-alive
    # connection, and one whose request line and headers have not all arrived (slow headers). Counted
    # from the connection's start or its previous answer's end; a request being answered is never cut.
    idle_timeout_s: float = Field(75.0, gt=0)
    # Connections open at once, in all and from one client address (None: no per-address limit; behind
    # a load balancer every connection comes from its address). One more is answered 503
    # `too_many_connections` (Retry-After: 1) and closed. `wattproxy serve` raises the process's open
    # file limit to fit max_connections where the system allows it.
    max_connections: int = Field(4096, ge=1)
    max_connections_per_client: int | None = Field(None, ge=1)
    # Origins allowed to call the API from a browser; none by default (no CORS headers at all).
    cors_origins: list[str] = Field(default_factory=list)
    drain_timeout_s: float = Field(30.0, ge=0)
    torch_threads: int | None = Field(None, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "auto": uvloop where it is installed (a dependency on Linux and macOS), else asyncio's own loop.
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"

    def db_url(self) -> str:
        return self.db or f"sqlite:///{(self.data_dir / 'wattproxy.db').resolve()}"

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins_from_text(cls, value: object) -> object:
        """From the environment: a JSON list, or origins separated by commas."""
        if isinstance(value, str):
            text = value.strip()
            return (
                json.loads(text)
                if text.startswith("[")
                else [o.strip() for o in text.split(",") if o.strip()]
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _proxy_mode_defaults(cls, data: Any) -> Any:
        """Proxy mode: no embedded models, and room in a body for the images a vision model's chats
        carry (base64 in `image_url` parts), unless set."""
        if isinstance(data, dict) and data.get("upstream") is not None:
            defaults = {"models": [], "max_body_bytes": PROXY_MAX_BODY_BYTES}
            return {**{k: v for k, v in defaults.items() if k not in data}, **data}
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {dupes}")
        if not self.models and self.upstream is None:
            raise ValueError("at least one model (or an upstream) must be configured")
        return self


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """WATTPROXY_PORT=9000 -> {"port": "9000"}; WATTPROXY_CARBON__ZONE=FR -> {"carbon": {"zone": "FR"}}.
    A variable whose first part names no setting (a client's WATTPROXY_KEY, say) is ignored, with a
    warning; a wrong name inside a section (WATTPROXY_CARBON__ZONEX) is an error, as in the file."""
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        if path[0] not in Settings.model_fields:
            log.warning("environment variable %s names no setting: ignored", key)
            continue
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _json_or_text(value)
    return out


def _json_or_text(value: str) -> Any:
    """A list or table given as JSON (WATTPROXY_MODELS='[{"name": ...}]', WATTPROXY_UPSTREAM__DEVICES=[0,1]),
    parsed; anything else as written (each setting reads its own text: "0,1", "9000")."""
    if value.lstrip().startswith(("[", "{")):
        try:
            parsed = json.loads(value)
        except ValueError:
            return value
        if isinstance(parsed, list | dict):
            return parsed
    return value


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_settings(
    config_file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    ignore: tuple[str, ...] = (),
) -> Settings:
    """Build Settings from a TOML file, the environment and flag overrides (later wins), leaving out
    the top-level settings in `ignore` (those a command does not use: `keys` has no upstream).

    Raises ConfigError with every problem found, each naming its setting."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = config_file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from e
    data = _merge(data, _env_overrides(env))
    data = _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    for name in ignore:
        data.pop(name, None)
    try:
        return Settings.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from e
