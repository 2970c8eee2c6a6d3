"""``qconv ui``: the registry in a web browser, read-only, on 127.0.0.1 by default.

Two pages, rendered on the server as plain HTML (no script, nothing fetched from elsewhere):

- ``/``: the artifacts, with facets by method, bits and base model (each value a link that
  filters by it, with how many artifacts it has among those the other filters leave), perplexity
  and worst layer error as columns, sortable by the columns ``qconv ls --sort`` knows;
- ``/artifact/ID``: one artifact: its provenance, recipe, calibration, verify checks, metrics,
  pushes, per-layer errors (chart and table) and files (linked to the Hub at the latest push's
  commit when it was pushed).

Only the standard library serves it (``http.server``); every request opens the registry through
:func:`qconv.registry.open_registry_readonly`, a SQLite connection in ``mode=ro`` that SQLite
itself keeps from writing, so the pages always show the file as it is now, and neither a bug here
nor a request can change it. Only GET and HEAD are answered (405 otherwise).
"""

from __future__ import annotations

import re
import socket
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from qconv.errors import QconvError, UsageError
from qconv.html_page import (
    Markup,
    badge,
    external_link,
    fields,
    files_table,
    fmt_float,
    fmt_size,
    join,
    link,
    page,
    table,
    tag,
)
from qconv.layer_chart import layer_error_chart, layers_table
from qconv.registry import Registry, open_registry_readonly, registry_path
from qconv.registry.db import SORTS
from qconv.version import __version__

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
# The facets: a column of list_artifacts' rows and its heading.
FACETS = (("method", "method"), ("bits", "bits"), ("base_model", "base model"))
# The artifacts table: heading, and the --sort key its link sorts by (None: not sortable).
ARTIFACT_COLUMNS = (
    ("id", None),
    ("base model", "base"),
    ("method", "method"),
    ("bits", None),
    ("size", "size"),
    ("bits/w", "bits"),
    ("worst err", "error"),
    ("ppl", "ppl"),
    ("verified", None),
    ("pushes", None),
    ("created", "created"),
)
NUMERIC = ("bits", "size", "bits/w", "worst err", "ppl", "pushes")
ARTIFACT_PATH = re.compile(r"/artifact/([0-9a-fA-F]{1,12})/?")
# No script may run and nothing may load from elsewhere, whatever a value in the database holds.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; img-src data:",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class PageError(Exception):
    """A request that gets an error page: ``status`` and one line saying why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RegistryUIServer(ThreadingHTTPServer):
    """Serves the pages of the registry file ``registry_file`` on ``address`` (host, port)."""

    daemon_threads = True  # a request still being answered does not hold up Ctrl-C

    def __init__(self, registry_file: Path, address: tuple[str, int]):
        self.registry_file = registry_file
        if ":" in address[0]:  # an IPv6 address such as ::1
            self.address_family = socket.AF_INET6
        super().__init__(address, RegistryUIHandler)

    def host_allowed(self, host_header: str | None) -> bool:
        """Whether a request naming ``host_header`` may be answered. Listening on loopback, only
        loopback names are: a web page elsewhere could otherwise point a name of its own at
        127.0.0.1 (DNS rebinding) and read the pages, local paths and all, from the browser."""
        host = str(self.server_address[0])
        if host_header is None or not (host.startswith("127.") or host == "::1"):
            return True
        name = urlsplit(f"//{host_header}").hostname or ""
        return name in ("localhost", "::1") or name.startswith("127.")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"


def make_server(
    registry_file: str | Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> RegistryUIServer:
    """A server for the registry at ``registry_file`` (default :func:`registry_path`) listening on
    ``host``:``port`` (port 0: any free one; see ``server.url``); ``serve_forever()`` runs it.
    Raises RegistryError when there is no readable registry there, UsageError when it cannot
    listen there; nothing is served then."""
    path = Path(registry_file).expanduser() if registry_file is not None else registry_path()
    open_registry_readonly(path).close()
    try:
        return RegistryUIServer(path, (host, port))
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


class RegistryUIHandler(BaseHTTPRequestHandler):
    server: RegistryUIServer
    server_version = f"qconv-ui/{__version__}"

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _refuse(self) -> None:
        self._send(405, error_page(405, f"{self.command} is not allowed: this server only reads the registry"),
                   {"Allow": "GET, HEAD"})  # fmt: skip

    do_POST = do_PUT = do_PATCH = do_DELETE = _refuse

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the terminal keeps the one line saying where the pages are."""

    def _answer(self, send_body: bool) -> None:
        if not self.server.host_allowed(self.headers.get("Host")):
            message = f"a page of {self.server.url} asked for as {self.headers.get('Host')}: refused"
            self._send(421, error_page(421, message), send_body=send_body)
            return
        url = urlsplit(self.path)
        query = parse_qs(url.query, keep_blank_values=True)
        try:
            with open_registry_readonly(self.server.registry_file) as registry:
                status, body = 200, render(registry, url.path, query)
        except PageError as exc:
            status, body = exc.status, error_page(exc.status, str(exc))
        except QconvError as exc:  # the registry went away or broke since the server started
            status, body = 503, error_page(503, str(exc))
        self._send(status, body, send_body=send_body)

    def _send(
        self, status: int, body: str, headers: dict[str, str] | None = None, send_body: bool = True
    ) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for key, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(data)


def render(registry: Registry, path: str, query: dict[str, list[str]]) -> str:
    """The page at ``path`` (with the query's parameters); PageError for none there."""
    if path in ("/", "/artifacts", "/artifacts/"):
        return artifacts_page(registry, query)
    match = ARTIFACT_PATH.fullmatch(path)
    if match:
        return artifact_page(registry, match.group(1))
    raise PageError(404, f"no page at {path}")


def error_page(status: int, message: str) -> str:
    return page(
        f"{status}: {message}", join([tag("h1", f"{status}"), tag("p", message)]), header=_header(None)
    )


def _header(registry: Registry | None) -> Markup:
    where = [] if registry is None else [tag("span", str(registry.path), cls="where")]
    return join([link("/", "qconv registry"), *where])


# -- the artifacts page -------------------------------------------------------------------------
def _facet_key(value: Any) -> str:
    """A value as the text of its filter: '' for none (NULL)."""
    return "" if value is None else str(value)


def artifacts_page(registry: Registry, query: dict[str, list[str]]) -> str:
    sort = query.get("sort", ["created"])[-1]
    if sort not in SORTS:
        raise PageError(400, f"cannot sort by {sort!r}; choose from {', '.join(SORTS)}")
    reverse = query.get("reverse", [""])[-1] == "1"
    filters = {column: query[column][-1] for column, _ in FACETS if column in query}
    rows = registry.list_artifacts(sort=sort, reverse=reverse)

    def matches(row: dict, skip: str | None = None) -> bool:
        return all(_facet_key(row[c]) == v for c, v in filters.items() if c != skip)

    shown = [row for row in rows if matches(row)]
    # which layer is the worst: in the cell's tooltip (the names are long; the detail page has it)
    worst_layers = {
        r["id"]: r["worst_layer"] for r in registry.db.query("select id, worst_layer from artifacts")
    }
    state = {"sort": sort, "reverse": "1" if reverse else None, **filters}

    facets = [
        _facet(
            heading, column, Counter(_facet_key(r[column]) for r in rows if matches(r, skip=column)), state
        )
        for column, heading in FACETS
    ]

    headings = []
    for heading, key in ARTIFACT_COLUMNS:
        if key is None:
            headings.append(heading)
            continue
        active = key == sort
        arrow = (" ▲" if reverse == SORTS[key][1] else " ▼") if active else ""
        # a click on the column sorted by flips it; on another sorts by it in its natural order
        heading_link = link(
            _href(state, sort=key, reverse="1" if active and not reverse else None), heading + arrow
        )
        headings.append(heading_link)
    body_rows = [
        (
            link(f"/artifact/{quote(row['id'])}", row["id"], cls="mono"),
            tag("span", row["base_model"], cls="wrap"),
            row["label"] or row["method"],
            _facet_key(row["bits"]) or "-",
            fmt_size(row["size_bytes"]),
            fmt_float(row["bits_per_weight"], ".2f"),
            tag("span", fmt_float(row["worst_rel_error"]), title=worst_layers.get(row["id"])),
            fmt_float(row["ppl"], ".2f"),
            badge(row["verified"], "yes", "FAILED", "-"),
            str(row["pushes"] or "-"),
            tag("span", _time(row["created"])[:16], title=row["created"]),
        )
        for row in shown
    ]
    listing = _artifacts_table(headings, body_rows)
    active = [f"{heading} = {filters[c] or '(none)'}" for c, heading in FACETS if c in filters]
    noun = "artifact" if len(rows) == 1 else "artifacts"
    summary = f"{len(shown)} of {len(rows)} {noun}" if filters else f"{len(rows)} {noun}"
    content = join(
        [
            _newer_note(registry),
            tag("h1", summary),
            tag("p", join(["filtered by ", "; ".join(active), " · ", link("/", "show all")]), cls="muted")
            if active
            else "",
            tag(
                "div",
                join(
                    [
                        tag("nav", join(facets), cls="facets"),
                        tag("div", listing if shown else tag("p", "No artifact matches.", cls="muted")),
                    ]
                ),
                cls="layout",
            ),
        ]
    )
    return page(f"qconv registry: {summary}", content, header=_header(registry))


def _facet(heading: str, column: str, counts: Counter, state: dict[str, str | None]) -> Markup:
    """One facet: each value (most artifacts first) a link filtering by it, with its count; the
    value filtered by now in bold, with a link removing the filter."""
    items = []
    for value, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        label = value or "(none)"
        if state.get(column) == value:
            remove = link(_href(state, **{column: None}), "×", title="remove this filter")
            items.append(tag("li", join([tag("span", label, cls="active"), " ", remove])))
        else:
            choose = link(_href(state, **{column: value}), label)
            items.append(tag("li", join([choose, " ", tag("span", count, cls="count")])))
    return join([tag("h3", heading), tag("ul", join(items))])


def _artifacts_table(headings: list, rows: list) -> Markup:
    """html_page.table, but with links as headings (it right-aligns by the headings' text)."""
    plain = [heading for heading, _ in ARTIFACT_COLUMNS]
    numeric = set(NUMERIC)
    head = join(
        tag("th", h, cls="num" if p in numeric else None) for h, p in zip(headings, plain, strict=True)
    )
    body = join(
        tag(
            "tr",
            join(
                tag("td", cell, cls="num" if p in numeric else None)
                for cell, p in zip(row, plain, strict=True)
            ),
        )
        for row in rows
    )
    return tag("table", Markup(f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody>"), cls="artifacts")


def _href(state: dict[str, str | None], **changes: str | None) -> str:
    """The artifacts page's URL with ``state`` changed (None removes a parameter)."""
    merged = {**state, **changes}
    params = {k: v for k, v in merged.items() if v is not None and not (k == "sort" and v == "created")}
    return "/?" + urlencode(params) if params else "/"


def _time(created: str | None) -> str:
    return (created or "")[:19].replace("T", " ")


def _newer_note(registry: Registry) -> Markup:
    if not registry.newer:
        return Markup("")
    return tag(
        "p",
        f"Written by a newer qconv (migration {', '.join(registry.newer)}): shown as this qconv reads it.",
        cls="note",
    )


# -- one artifact -------------------------------------------------------------------------------
def artifact_page(registry: Registry, ref: str) -> str:
    try:
        record = registry.get_artifact(ref)
    except QconvError as exc:  # unknown or ambiguous id
        raise PageError(404, str(exc)) from None
    pushes = record["pushes"] or []
    latest = pushes[-1] if pushes else None
    sections: list[Any] = [
        _newer_note(registry),
        tag(
            "h1",
            join(
                [
                    tag("span", record["id"], cls="mono"),
                    "  ",
                    record["label"] or record["method"],
                    " ",
                    badge(record["verified"]),
                ]
            ),
        ),
        fields(
            [
                ("folder", tag("span", record["path"], cls="mono")),
                ("created", _time(record["created"])),
                ("qconv", record["qconv_version"]),
                ("size", f"{fmt_size(record['size_bytes'])} ({record['size_bytes']} bytes)"),
                ("bits/weight", fmt_float(record["bits_per_weight"], ".3f")),
                ("params", f"{record['quantized_params']} quantized of {record['total_params']}"),
                ("worst layer", f"{record['worst_layer'] or '-'} ({fmt_float(record['worst_rel_error'])})"),
            ]
        ),
        tag("h2", "source"),
        fields(
            [
                ("base model", record["base_model"]),
                ("kind", record["source_kind"]),
                ("ref", record["source_ref"]),
                ("revision", record["source_revision"]),
                ("architecture", record.get("source_architecture")),
            ]
        ),
    ]
    if record["source_files"]:
        sections.append(files_table(record["source_files"]))
    sections += [tag("h2", "recipe"), fields((record["recipe"] or {}).items())]
    sections += [
        tag("h2", "calibration"),
        fields(record["calibration"].items())
        if isinstance(record["calibration"], dict)
        else tag("p", "none (data-free)", cls="muted"),
    ]
    sections += [tag("h2", "environment"), fields((record["environment"] or {}).items())]
    if record["skipped"]:
        sections += [tag("h2", "left unquantized"), fields(record["skipped"].items())]
    verify = record["verify"]
    sections.append(tag("h2", "verify"))
    if isinstance(verify, dict):
        sections.append(
            table(
                ("check", "result", "detail"),
                (
                    (c.get("name"), badge(c.get("passed"), "pass", "FAIL"), c.get("detail", ""))
                    for c in verify.get("checks", [])
                ),
            )  # fmt: skip
        )
    else:
        sections.append(tag("p", "never verified", cls="muted"))
    sections.append(tag("h2", f"metrics ({len(record['metrics'])})"))
    if record["metrics"]:
        sections.append(
            table(
                ("metric", "value", "dataset", "seqlen", "windows", "tokens", "device", "measured"),
                (
                    (
                        m["name"],
                        fmt_float(m["value"], ".4f"),
                        m.get("dataset"),
                        m.get("seqlen"),
                        m.get("windows"),
                        m.get("tokens"),
                        (m["protocol"] if isinstance(m["protocol"], dict) else {}).get("device"),
                        _time(m["created"]),
                    )
                    for m in record["metrics"]
                ),
                ("value", "seqlen", "windows", "tokens"),
            )
        )
    sections.append(tag("h2", f"pushes ({len(pushes)})"))
    if pushes:
        sections.append(
            table(
                ("repo", "revision", "commit", "url", "pushed"),
                (
                    (
                        p["repo"],
                        p["revision"],
                        tag("span", p["commit_sha"], cls="mono"),
                        external_link(p["url"]),
                        _time(p["created"]),
                    )
                    for p in pushes
                ),  # fmt: skip
            )
        )
    layers = record["layers"]
    sections += [
        tag("h2", f"per-layer error ({len(layers)} layers)"),
        layer_error_chart(layers, "relative error by block, one series per module type"),
        layers_table(layers) if layers else "",
        tag("h2", f"files ({len(record['files'])})"),
        files_table(record["files"], _hub_file_url(latest)),
    ]
    title = f"{record['id']} {record['label'] or record['method']}"
    return page(f"qconv registry: {title}", join(sections), header=_header(registry))


def _hub_file_url(push: dict | None):
    """Where each file is on the Hub at a push's commit (the push's recorded url +
    ``/blob/<commit>/<name>``), or None for an artifact never pushed."""
    if not push or not push.get("url") or not (push.get("commit_sha") or push.get("revision")):
        return None
    base = str(push["url"]).rstrip("/")
    at = quote(push.get("commit_sha") or push["revision"], safe="")
    return lambda name: f"{base}/blob/{at}/{quote(name)}"
