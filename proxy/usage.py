"""Usage reports from the ledger, shared by `GET /v1/usage` and `wattproxy usage`.

Smartphone charges: 0.012 kWh per charge by default, the figure used by Luccioni, Jernite and
Strubell, "Power Hungry Processing" (2023), the study this project comes from.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from proxy.ledger import UsageRow

JOULES_PER_KWH = 3.6e6
PHONE_CHARGE_KWH = 0.012
COLUMNS = (
    "group",
    "requests",
    "kwh",
    "joules",
    "co2_grams",
    "images",
    "prompt_tokens",
    "completion_tokens",
    "j_per_image",
    "j_per_token",
    "smartphone_charges",
)


@dataclass(frozen=True)
class ReportRow:
    group: str | None
    requests: int
    kwh: float
    joules: float
    co2_grams: float
    images: int
    prompt_tokens: int
    completion_tokens: int
    j_per_image: float | None  # energy of image requests / images
    j_per_token: float | None  # energy of text requests / (prompt + completion tokens)
    smartphone_charges: float


def report_row(row: UsageRow, phone_charge_kwh: float = PHONE_CHARGE_KWH) -> ReportRow:
    tokens = row.prompt_tokens + row.completion_tokens
    kwh = row.joules / JOULES_PER_KWH
    return ReportRow(
        group=row.group,
        requests=row.requests,
        kwh=kwh,
        joules=row.joules,
        co2_grams=row.co2_grams,
        images=row.images,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        j_per_image=row.image_joules / row.images if row.images else None,
        j_per_token=row.text_joules / tokens if tokens else None,
        smartphone_charges=kwh / phone_charge_kwh,
    )


def total_row(rows: Sequence[UsageRow]) -> UsageRow:
    return UsageRow(
        group=None,
        requests=sum(r.requests for r in rows),
        joules=sum(r.joules for r in rows),
        co2_grams=sum(r.co2_grams for r in rows),
        images=sum(r.images for r in rows),
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        image_joules=sum(r.image_joules for r in rows),
        text_joules=sum(r.text_joules for r in rows),
    )


# Unix seconds, as a time may be given (the OpenAPI document's pattern too), and ISO 8601's basic date
# (20261128), which eight digits that are a calendar date are read as (as Unix seconds they would be a
# time in 1970-1973); other eight digits are Unix seconds
UNIX_SECONDS = r"[0-9]{1,12}(\.[0-9]+)?"
BASIC_DATE = r"[0-9]{8}"
_UNIX_SECONDS = re.compile(UNIX_SECONDS)
MAX_UNIX_S = 253_402_300_799.0  # 9999-12-31T23:59:59Z
_BASIC_DATE = re.compile(BASIC_DATE)


def parse_time(value: str | None, name: str) -> datetime | None:
    """ISO 8601 date or datetime (UTC when no zone is given; the basic date 20261128 too), or Unix
    seconds (as OpenAI's own usage API takes its times); ValueError naming the parameter."""
    if value is None or value == "":
        return None
    try:
        if _BASIC_DATE.fullmatch(value) and (date := _basic_date(value)) is not None:
            when = date
        elif _UNIX_SECONDS.fullmatch(value):  # twelve digits reach past 9999, as far as a datetime goes
            return datetime.fromtimestamp(min(float(value), MAX_UNIX_S), timezone.utc)
        else:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError) as e:
        raise ValueError(
            f"{name} must be an ISO 8601 date or time, e.g. 2026-11-01T12:00:00Z, or Unix seconds"
        ) from e
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _basic_date(value: str) -> datetime | None:
    """Eight digits as a calendar date (20261128), or None where they are none (00000000: Unix seconds)."""
    try:
        return datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return None


def check_range(start: datetime | None, end: datetime | None, names: tuple[str, str]) -> None:
    """ValueError when `end` is not after `start`: a report covers [start, end), which would be empty."""
    if start is not None and end is not None and end <= start:
        raise ValueError(
            f"{names[1]} ({end.isoformat()}) must be after {names[0]} ({start.isoformat()}): a report covers "
            f"[{names[0]}, {names[1]}) ({names[1]}=2026-11-02 takes in all of 2026-11-01, none of 2026-11-02)"
        )


def usage_meta(
    user: str | None,
    start: datetime | None,
    end: datetime | None,
    group_by: str | None,
    phone_charge_kwh: float,
) -> dict[str, object]:
    """The header of a JSON usage report (HTTP and CLI alike)."""
    return {
        "object": "usage",
        "user": user,
        "start": start.isoformat() if start else None,
        "end": end.isoformat() if end else None,
        "group_by": group_by,
        "phone_charge_kwh": phone_charge_kwh,
    }


def as_json(rows: Sequence[ReportRow], total: ReportRow, meta: dict[str, object]) -> str:
    return json.dumps({**meta, "data": [asdict(r) for r in rows], "total": asdict(total)}, indent=2)


def as_csv(rows: Sequence[ReportRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for r in rows:
        d = asdict(r)
        writer.writerow(["" if d[c] is None else d[c] for c in COLUMNS])
    return out.getvalue()


def as_table(rows: Sequence[ReportRow], total: ReportRow, group_label: str) -> str:
    header = (group_label, "requests", "kWh", "gCO2e", "images", "tokens", "J/image", "J/token", "charges")
    lines = [header]
    for r in [*rows, total]:
        lines.append(
            (
                r.group if r.group is not None else ("total" if r is total else "all"),
                str(r.requests),
                f"{r.kwh:.6g}",
                f"{r.co2_grams:.6g}",
                str(r.images),
                str(r.prompt_tokens + r.completion_tokens),
                "-" if r.j_per_image is None else f"{r.j_per_image:.4g}",
                "-" if r.j_per_token is None else f"{r.j_per_token:.4g}",
                f"{r.smartphone_charges:.4g}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)
