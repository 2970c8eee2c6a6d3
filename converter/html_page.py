"""Plain server-rendered HTML for the pages qconv writes or serves (``qconv verify --report`` and
``qconv ui``): one stylesheet inlined in each page, tables, numbers, no script and no asset
fetched from anywhere, so a page works saved to disk, offline, or mailed.

Every value reaches the page through :func:`esc` (or :func:`table`, which escapes each cell):
names, paths and recipe values come from files a user may not have written. Only fragments this
module or its callers built from escaped parts are marked :class:`Markup` and passed through.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit


class Markup(str):
    """HTML that is already safe (built from escaped parts): :func:`esc` and :func:`table` pass it
    through unchanged."""

    def __add__(self, other: str) -> Markup:
        return Markup(str(self) + esc(other))


def esc(value: Any) -> Markup:
    """``value`` as HTML text: escaped (quotes too, so it is safe in an attribute), ``-`` for None,
    JSON for a dict or list, Markup as it is."""
    if isinstance(value, Markup):
        return value
    if value is None:
        return Markup("-")
    if isinstance(value, (dict, list)):
        value = json.dumps(value)
    return Markup(html.escape(str(value), quote=True))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(esc(sep).join(esc(p) for p in parts))


def tag(name: str, content: Any = "", **attrs: Any) -> Markup:
    """``<name attr="...">content</name>``; attributes whose value is None are left out, ``cls``
    is ``class``."""
    shown = "".join(
        f' {"class" if key == "cls" else key.replace("_", "-")}="{esc(value)}"'
        for key, value in attrs.items()
        if value is not None
    )
    return Markup(f"<{name}{shown}>{esc(content)}</{name}>")


def link(href: str, text: Any, **attrs: Any) -> Markup:
    return tag("a", text, href=href, **attrs)


def external_link(url: Any, text: Any = None) -> Markup:
    """A link to ``url`` when it is an http(s) URL (a recorded push's, say); anything else (a
    ``javascript:`` URL written into the database by hand) is shown as text only."""
    if isinstance(url, str) and urlsplit(url).scheme in ("http", "https"):
        return link(url, url if text is None else text, rel="noreferrer")
    return esc(url if text is None else text)


def fmt_float(x: float | None, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def fmt_size(n: int | None) -> str:
    """Decimal units, as ``qconv ls`` shows sizes."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return str(n)


def table(
    headers: Iterable[str], rows: Iterable[Iterable[Any]], numeric: Iterable[str] = (), **attrs
) -> Markup:
    """A table; every cell escaped (Markup cells as they are). Columns named in ``numeric`` are
    right-aligned."""
    headers = list(headers)
    right = set(numeric)
    head = join(tag("th", h, cls="num" if h in right else None) for h in headers)
    body = join(
        tag(
            "tr",
            join(
                tag("td", cell, cls="num" if h in right else None)
                for h, cell in zip(headers, row, strict=True)
            ),
        )
        for row in rows
    )
    return tag("table", Markup(f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"), **attrs)


def fields(pairs: Iterable[tuple[str, Any]]) -> Markup:
    """A two-column key/value table (a recipe, an environment)."""
    rows = join(tag("tr", tag("th", key) + tag("td", value)) for key, value in pairs)
    return tag("table", rows, cls="fields")


def files_table(files: dict[str, dict], href=None) -> Markup:
    """An artifact's (or a source's) files: name, size, sha256. ``href(name)``, when given, is a
    URL to link each name to (an http(s) one only)."""
    rows = (
        (
            external_link(href(name), name) if href else tag("span", name, cls="mono"),
            fmt_size(entry.get("size")),
            entry.get("size"),
            tag("span", entry.get("sha256"), cls="mono"),
        )
        for name, entry in files.items()
    )
    return table(("name", "size", "bytes", "sha256"), rows, ("size", "bytes"))


def badge(
    passed: bool | None, yes: str = "passed", no: str = "FAILED", never: str = "never verified"
) -> Markup:
    if passed is None:
        return tag("span", never, cls="badge none")
    return tag("span", yes if passed else no, cls="badge ok" if passed else "badge bad")


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:10px 24px;display:flex;gap:18px;align-items:baseline}
header a{color:#fff;text-decoration:none;font-weight:600}header .where{color:#aab3c5;font-size:12px}
main{padding:16px 24px;max-width:1400px}
h1{font-size:20px;margin:4px 0 12px}h2{font-size:16px;margin:22px 0 8px}
a{color:#1f5fbf}
table{border-collapse:collapse;background:#fff;margin:4px 0 12px;font-size:13px}
th,td{border-bottom:1px solid #e3e6eb;padding:4px 10px;text-align:left;vertical-align:top}
thead th{background:#eef1f5;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.artifacts td{white-space:nowrap}.wrap{white-space:normal}table.artifacts th,table.artifacts td{padding:4px 8px}
table.fields th{background:none;font-weight:600;color:#4a5468;white-space:nowrap}
.mono,code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:12px}
.badge{display:inline-block;border-radius:3px;padding:0 6px;font-size:12px;font-weight:600}
.ok{background:#dcf3e2;color:#14662e}.bad{background:#fbe0e0;color:#a01919}.none{background:#eceef2;color:#5b6478}
.layout{display:flex;gap:20px;align-items:flex-start}
.facets{min-width:160px;max-width:220px}
.facets h3{font-size:13px;margin:12px 0 4px;color:#4a5468;text-transform:uppercase;letter-spacing:.04em}
.facets ul{list-style:none;margin:0;padding:0}.facets li{padding:1px 0;overflow-wrap:anywhere}
.facets .count{color:#7a8396;font-size:12px}.facets .active{font-weight:700}
.muted{color:#7a8396}.note{background:#fff6d6;padding:6px 10px;border-radius:3px}
svg{background:#fff}
"""


def page(title: str, body: Any, *, header: Any = "") -> str:
    """A whole HTML document: ``title`` escaped, ``body`` and ``header`` as given (escaped unless
    Markup)."""
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head>"
        f"<body>{tag('header', header) if header else ''}<main>{esc(body)}</main></body></html>\n"
    )
