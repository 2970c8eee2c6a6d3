"""`qconv ui`: the registry served read-only over HTTP, fetched as a browser would (no browser)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest
from test_registry import PASSED, make_manifest

from qconv.errors import RegistryError
from qconv.layer_chart import layer_error_chart, layer_position, model_order
from qconv.registry import open_registry, open_registry_readonly, registry_path
from qconv.ui import make_server


class Page(HTMLParser):
    """What a test reads off a page: the text of each table row of ``table.artifacts`` (or of
    every table), every link, every tag name, and the text."""

    def __init__(self, html: str):
        super().__init__()
        self.rows: list[list[str]] = []
        self.links: dict[str, str] = {}
        self.tags: set[str] = set()
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._href: str | None = None
        self._in_body = False
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        if tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.rows.append([])
        elif tag == "td" and self._in_body:
            self._cell = []
        elif tag == "a":
            self._href = attrs.get("href")

    def handle_endtag(self, tag):
        if tag == "tbody":
            self._in_body = False
        elif tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "a":
            self._href = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)
        if self._href is not None:
            self.links[data.strip()] = self._href

    @property
    def all_text(self) -> str:
        return "".join(self.text)


def fetch(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read().decode("utf-8")


@pytest.fixture
def recorded(tmp_path, qconv_home):
    """Three artifacts: a bnb 8-bit (pushed, a label holding HTML), an hqq from the Hub
    (perplexity measured), a bnb 4-bit; then the registry closed, as after `qconv convert`."""
    eight = make_manifest("bnb", "2026-11-24T20:00:00+00:00", verify=PASSED)
    eight["recipe"].update(bits=8, label="bnb <script>alert(1)</script> & int8")
    hqq = make_manifest("hqq", "2026-11-24T21:00:00+00:00")
    hqq["source"].update(kind="hub", ref="HuggingFaceTB/SmolLM2-360M", revision="f" * 40)
    four = make_manifest("bnb", "2026-11-24T22:00:00+00:00")
    with open_registry() as registry:
        a = registry.record_artifact(eight, tmp_path / "a")
        b = registry.record_artifact(hqq, tmp_path / "b")
        c = registry.record_artifact(four, tmp_path / "c")
        registry.record_push(a, "me/smol-int8", "main", "a" * 40, "https://huggingface.co/me/smol-int8")
        registry.record_metrics(b, {"ppl": 21.61}, {"dataset": "wikitext-2", "seqlen": 2048})
    return {"a": a, "b": b, "c": c}


@pytest.fixture
def served(recorded):
    server = make_server(None, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()
    thread.join(5)


def listed_ids(page: Page) -> list[str]:
    return [row[0] for row in page.rows]


def test_the_artifacts_page_lists_every_artifact_with_facets(served, recorded):
    a, b, c = recorded["a"], recorded["b"], recorded["c"]
    status, headers, html = fetch(served)
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script
    page = Page(html)
    assert listed_ids(page) == [c, b, a]  # newest first
    row = dict(zip(["id", "base", "method", "bits", "size", "bpw", "err", "ppl", "verified", "pushes", "created"],
                   page.rows[1], strict=True))  # fmt: skip
    assert (row["base"], row["method"], row["bits"], row["err"], row["ppl"]) == (
        "HuggingFaceTB/SmolLM2-360M", "hqq nf4+dq", "4", "0.1100", "21.61",
    )  # fmt: skip
    assert page.rows[2][8] == "yes" and page.rows[2][9] == "1"
    # a value holding HTML is shown as text, never as markup
    assert "<script" not in html and "bnb &lt;script&gt;alert(1)&lt;/script&gt; &amp; int8" in html
    assert page.rows[2][2] == "bnb <script>alert(1)</script> & int8"
    assert "METHOD" in page.all_text.upper() and "base model" in page.all_text
    assert page.links[c] == f"/artifact/{c}"

    # facets: a value's link filters by it; the counts are those the other filters leave
    assert (
        page.links["bnb"] == "/?method=bnb"
        and page.links["HuggingFaceTB/SmolLM2-360M"] == "/?base_model=HuggingFaceTB%2FSmolLM2-360M"
    )
    bnb = Page(fetch(served + "?method=bnb")[2])
    assert listed_ids(bnb) == [c, a]
    assert bnb.links["×"] == "/"  # the filter in force, with a link that removes it
    assert bnb.links["hqq"] == "/?method=hqq" and bnb.links["8"] == "/?method=bnb&bits=8"
    assert "4" in bnb.links and "SmolLM2-360M" not in bnb.all_text  # counted among bnb only
    assert bnb.all_text.count("2 of 3 artifacts") == 2  # the title and the heading
    assert listed_ids(Page(fetch(served + "?method=bnb&bits=8")[2])) == [a]
    assert listed_ids(Page(fetch(served + "?base_model=HuggingFaceTB/SmolLM2-360M")[2])) == [b]
    assert listed_ids(Page(fetch(served + "?method=aqlm")[2])) == []
    assert "No artifact matches." in fetch(served + "?method=aqlm")[2]
    # sorting by the columns `qconv ls --sort` knows
    assert listed_ids(Page(fetch(served + "?sort=ppl")[2])) == [b, c, a]
    assert listed_ids(Page(fetch(served + "?sort=created&reverse=1")[2])) == [a, b, c]
    status, _, html = fetch(served + "?sort=colour")
    assert status == 400 and "cannot sort by &#x27;colour&#x27;" in html


def test_the_artifact_page_shows_files_recipe_layers_and_pushes(served, recorded):
    a = recorded["a"]
    status, _, html = fetch(f"{served}artifact/{a[:6]}")
    assert status == 200
    page = Page(html)
    text = page.all_text
    for expected in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "b" * 64, "c" * 64,
                     "quant_type", "nf4", "me/smol-int8", "a" * 40, "bitsandbytes", "0.50.2"):  # fmt: skip
        assert expected in text, expected
    assert "svg" in page.tags  # the per-layer error chart
    # pushed: each file links to the Hub at the push's commit
    assert (
        page.links["model.safetensors"]
        == f"https://huggingface.co/me/smol-int8/blob/{'a' * 40}/model.safetensors"
    )
    assert page.links["https://huggingface.co/me/smol-int8"] == "https://huggingface.co/me/smol-int8"
    status, _, html = fetch(f"{served}artifact/abcdef012345")
    assert status == 404 and "no artifact with id &#x27;abcdef012345&#x27;" in html
    assert fetch(f"{served}nothing/here")[0] == 404


def test_the_server_cannot_write_the_registry(served, recorded, qconv_home):
    """Only GET and HEAD are answered, and the connection the pages are read through is one SQLite
    refuses to write with: the file is byte for byte what it was."""
    db = qconv_home / "registry.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, html = fetch(served, method)
        assert status == 405 and headers["Allow"] == "GET, HEAD", method
        assert f"{method} is not allowed: this server only reads the registry" in html
    assert fetch(served, "HEAD")[0] == 200
    for path in ("", f"artifact/{recorded['a']}", "?method=bnb"):
        assert fetch(served + path)[0] == 200
    with open_registry_readonly(db) as registry:
        with pytest.raises(sqlite3.OperationalError, match="attempt to write a readonly database"):
            registry.db.execute("delete from artifacts")
        with pytest.raises(RegistryError, match="attempt to write a readonly database"):
            registry.record_push(recorded["a"], "me/x", "main", None, None)
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    with open_registry() as registry:
        assert len(registry.list_artifacts()) == 3 and len(registry.list_pushes()) == 1


def test_ui_errors(cli, qconv_home, recorded):
    db = qconv_home / "registry.db"
    db.rename(qconv_home / "moved.db")
    result = cli("ui", ok=None)
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr == f"Error: {db}: no registry there (nothing has been recorded yet)\n"
    assert not db.exists()  # nothing created
    (qconv_home / "moved.db").rename(db)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("ui", "--port", port, ok=None)
        as_json = cli("ui", "--port", port, "--json", ok=None)
    assert result.exit_code == 2
    assert result.stderr == f"Error: cannot listen on 127.0.0.1:{port} (Address already in use)\n"
    assert json.loads(as_json.stdout) == {
        "error": f"cannot listen on 127.0.0.1:{port} (Address already in use)",
        "exit_code": 2,
    }
    result = cli("ui", "--port", "70000", ok=None)
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: Invalid value for '--port': 70000 is not in the range 0<=x<=65535. (see 'qconv ui --help')\n"
    )
    other = qconv_home / "other.db"
    sqlite3.connect(other).execute("create table notes (x)").connection.close()
    with pytest.raises(
        RegistryError, match=r"not a qconv registry \(a SQLite database with other tables: notes\)"
    ):
        make_server(other, "127.0.0.1", 0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_qconv_ui_serves_until_ctrl_c(recorded, qconv_home, signum):
    """The real command in a process of its own: one line saying where, pages over HTTP, and
    Ctrl-C (or SIGTERM) ends it with one line."""
    env = {**os.environ, "QCONV_HOME": str(qconv_home)}
    as_json = ["--json"] if signum == signal.SIGTERM else []
    process = subprocess.Popen(
        [sys.executable, "-m", "qconv", "ui", "--port", "0", *as_json],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        if as_json:  # one JSON document, on several lines
            document = json.loads("".join(iter(process.stdout.readline, "}\n")) + "}")
            url = document["url"]
            assert document == {"registry": str(registry_path()), "url": url}
        else:
            line = process.stdout.readline()
            url = line.split(" at ")[1].split(" ")[0]
            assert line == f"serving {registry_path()} read-only at {url} (Ctrl-C stops)\n"
        assert url.startswith("http://127.0.0.1:")
        assert listed_ids(Page(fetch(url)[2])) == [recorded["c"], recorded["b"], recorded["a"]]
        process.send_signal(signum)
        out, err = process.communicate(timeout=30)
    finally:
        process.kill()
    what = "Interrupted (SIGINT)" if signum == signal.SIGINT else "Terminated (SIGTERM)"
    assert (process.returncode, out, err) == (128 + signum, "", f"{what}: qconv ui stopped serving {url}\n")


# -- the chart --------------------------------------------------------------------------------
def test_layer_positions_and_the_chart_for_any_architecture():
    assert layer_position("model.layers.3.self_attn.q_proj") == (3, "q")
    assert layer_position("transformer.h.11.attn.c_attn") == (11, "c_attn")
    assert layer_position("model.layers.0.block_sparse_moe.experts.7.w1") == (0, "w1")
    assert layer_position("lm_head") == (None, "lm_head")
    layers = {
        name: {"rel_error": error}
        for name, error in [
            ("model.layers.10.mlp.down_proj", 0.3),
            ("model.layers.2.mlp.down_proj", 0.2),
            ("model.layers.2.self_attn.q_proj", 0.1),
            ("model.layers.2.self_attn.<b>_proj", 0.1),
            ("lm_head", 0.05),
            ("model.layers.3.mlp.up_proj", None),
        ]
    }
    assert model_order(layers) == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.mlp.down_proj",
        "model.layers.2.self_attn.<b>_proj",
        "model.layers.3.mlp.up_proj",
        "model.layers.10.mlp.down_proj",
        "lm_head",
    ]
    svg = layer_error_chart(layers)
    page = Page(svg)
    assert "svg" in page.tags and "<b>" not in svg  # a name is text, never markup
    assert page.all_text.count("model.layers.2.self_attn.<b>_proj: 0.1") == 1  # the dot's tooltip
    assert svg.count("<circle") == 4 and svg.count("<polyline") == 3  # q, down, <b>: one line each
    assert "Not plotted (in no numbered block, or no finite error): model.layers.3.mlp.up_proj, lm_head." in (
        page.all_text
    )
    assert "No per-layer errors to chart." in layer_error_chart({})


def test_the_pages_need_nothing_from_elsewhere(served, recorded):
    for path in ("", f"artifact/{recorded['a']}"):
        html = fetch(served + path)[2]
        assert "<script" not in html and "src=" not in html and "<link" not in html and "@import" not in html


def test_a_registry_written_by_a_newer_qconv_is_shown_with_a_note(served, recorded, qconv_home):
    with sqlite3.connect(qconv_home / "registry.db") as conn:
        conn.execute(
            "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) VALUES (?, ?, ?)",
            ("qconv", "m099_future", "2027-01-01 00:00:00+00:00"),
        )
    conn.close()
    page = Page(fetch(served)[2])
    assert len(page.rows) == 3
    assert "Written by a newer qconv (migration m099_future): shown as this qconv reads it." in page.all_text


def test_a_page_asked_for_under_another_name_is_refused(served):
    """DNS rebinding: a site whose name now points at 127.0.0.1 must not read the pages."""
    status, _, html = fetch(served, headers={"Host": "evil.example:8765"})
    assert status == 421 and f"a page of {served} asked for as evil.example:8765: refused" in html
    port = served.rsplit(":", 1)[1].strip("/")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert fetch(served, headers={"Host": host})[0] == 200, host
