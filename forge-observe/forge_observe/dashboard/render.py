"""HTML rendering: Jinja2 templates (autoescaped), number and time formats, static files under
content-hashed names (cached for good by browsers, never stale after an upgrade)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from urllib.parse import urlencode
from pathlib import Path
from typing import Any, Iterable

import jinja2
from markupsafe import Markup, escape

HERE = Path(__file__).parent
PREFIX = "/_forge"
_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".txt": "text/plain; charset=utf-8",
          ".svg": "image/svg+xml"}


class Static:
    """Files of ``static/`` served as ``name.<sha256 prefix>.ext``."""

    def __init__(self, folder: Path = HERE / "static") -> None:
        self.by_url: dict[str, tuple[bytes, str]] = {}
        self.url_of: dict[str, str] = {}
        for path in sorted(folder.iterdir()):
            if not path.is_file():
                continue
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()[:12]
            stem, dot, ext = path.name.partition(".")
            hashed = f"{stem}.{digest}.{ext}" if dot else f"{stem}.{digest}"
            self.by_url[hashed] = (data, _TYPES.get(path.suffix, "application/octet-stream"))
            self.url_of[path.name] = f"{PREFIX}/static/{hashed}"

    def url(self, name: str) -> str:
        return self.url_of[name]


# --- formats for people ----------------------------------------------------------------------
def num(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{int(value):,}"


def compact(value: Any) -> str:
    if value is None:
        return "–"
    v = float(value)
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.1f}".rstrip("0").rstrip(".") + unit
    return num(value)


def duration_ms(value: Any) -> str:
    if value is None:
        return "–"
    ms = float(value)
    if ms < 1:
        return f"{ms * 1000:.0f} µs"
    if ms < 1000:
        return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"
    s = ms / 1000
    if s < 60:
        return f"{s:.2f} s" if s < 10 else f"{s:.1f} s"
    m, s = divmod(int(s), 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min" if h < 48 else f"{h // 24} d {h % 24} h"


def seconds(value: Any) -> str:
    return "–" if value is None else duration_ms(float(value) * 1000)


def pct(value: Any) -> str:
    if value is None:
        return "–"
    v = float(value) * 100
    return f"{v:.2f} %" if 0 < v < 1 else f"{v:.1f} %"


def _parse(value: Any) -> dt.datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return dt.datetime.fromisoformat(str(value))


def relative(value: Any, now: dt.datetime | None = None) -> str:
    t = _parse(value)
    if t is None:
        return "–"
    now = now or dt.datetime.now(dt.timezone.utc)
    delta = (now - t).total_seconds()
    future = delta < 0
    d = abs(delta)
    if d < 5:
        text = "just now" if not future else "in a moment"
        return text
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min"), (1, "s")):
        if d >= size:
            n = int(d // size)
            text = f"{n} {unit}"
            break
    return f"in {text}" if future else f"{text} ago"


def when(value: Any) -> Markup:
    """A ``<time>`` the page's script keeps current ("3 min ago"), with the exact UTC time as tooltip."""
    t = _parse(value)
    if t is None:
        return Markup("<span class=muted>–</span>")
    # the text is the exact time: the page's script turns it into "3 min ago" and keeps it current, so a
    # live fragment only changes when the data does
    exact = t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return Markup('<time datetime="{}" title="{}" data-rel>{}</time>').format(t.isoformat(), exact, exact)


def spark(values: Iterable[float], height: int = 36, label: str = "") -> Markup:
    """A bar chart of a series as inline SVG (no script, no chart library)."""
    vals = [float(v or 0) for v in values]
    if not vals:
        return Markup("")
    top = max(vals) or 1.0
    w = 4
    bars = []
    for i, v in enumerate(vals):
        h = 0 if v <= 0 else max(1.5, v / top * (height - 2))
        bars.append(f'<rect x="{i * w}" y="{height - h:.1f}" width="{w - 1}" height="{h:.1f}"><title>{num(v)}</title></rect>')
    return Markup('<svg class="spark" viewBox="0 0 {} {}" preserveAspectRatio="none" role="img" aria-label="{}">{}</svg>').format(
        len(vals) * w, height, label, Markup("".join(bars)))


def pretty_json(value: Any) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def status_class(value: Any) -> str:
    v = str(value or "")
    if v in ("succeeded", "running", "ok", "applied", "resolved", "ready"):
        return "ok"
    if v in ("dead", "failed", "error", "drift", "firing", "unresponsive", "blocked"):
        return "bad"
    if v in ("pending", "scheduled", "waiting", "queued", "retrying", "draining", "starting", "paused"):
        return "warn"
    return "muted"


def query_string(filters: dict[str, Any], **more: Any) -> str:
    values = {**filters, **more}
    return urlencode({k: ("1" if v is True else v) for k, v in values.items() if v not in (None, "", False)})


class Renderer:
    def __init__(self) -> None:
        self.static = Static()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(str(HERE / "templates")), autoescape=True,
            undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
        self.env.filters.update(num=num, compact=compact, ms=duration_ms, seconds=seconds, pct=pct, when=when,
                                spark=spark, pretty=pretty_json, status=status_class)
        self.env.globals.update(static=self.static.url, P=PREFIX, qs=query_string)
        # macros as a global: a live fragment renders one block alone, outside the page's imports
        self.env.globals["m"] = self.env.get_template("macros.html").module

    def page(self, template: str, **ctx: Any) -> str:
        return self.env.get_template(template).render(**ctx)

    def block(self, template: str, block: str, **ctx: Any) -> str:
        tmpl = self.env.get_template(template)
        return "".join(tmpl.blocks[block](tmpl.new_context(ctx)))


__all__ = ["Renderer", "escape"]
