"""A loopback Hugging Face Hub for tests: the endpoints the real ``huggingface_hub`` client uses to
create a repo, read a repo's info, upload a folder (preupload, LFS batch, PUT, verify, ndjson
commit), create a branch, list a tree and download files, in memory, on 127.0.0.1.

It can inject faults, each for the next matching request(s): an HTTP status (``fail_next``), a
connection closed while the request body is being read (``drop_connection_next``, e.g. mid LFS
upload), a commit applied whose response is then lost (``commit_then_drop_response``), a slow
response (``delay_next``), and a request held until the test lets it go (``stall_next``; with
``after_commit`` the commit is applied first), for a test to kill the client while it waits.

Commits are real enough: a commit's sha is the sha1 of its parent, message and files; an LFS
file's oid is the sha256 of its bytes; a regular file's blob id is git's blob sha1. Every write
needs ``Authorization: Bearer <token>`` with the server's token (401 otherwise); reads accept no
token or the right one (401 for a wrong one).

huggingface_hub reads ``HF_ENDPOINT`` when it is imported: tests/conftest.py sets it (to this
server's port, chosen then) before anything imports huggingface_hub.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


@dataclass
class StoredFile:
    size: int
    lfs_oid: str | None = None  # sha256 of the bytes, for LFS files
    content: bytes | None = None  # regular files

    @property
    def blob_id(self) -> str:
        if self.lfs_oid is not None:
            return git_blob_sha1(lfs_pointer(self.lfs_oid, self.size))
        return git_blob_sha1(self.content or b"")

    @property
    def etag(self) -> str:
        return self.lfs_oid or self.blob_id


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, StoredFile]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)

    def head(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision)
        return self.commits.get(sha)

    def history(self, branch: str = "main") -> list[Commit]:
        """Commits of ``branch``, newest first."""
        out, commit = [], self.head(branch)
        while commit is not None:
            out.append(commit)
            commit = self.commits.get(commit.parent) if commit.parent else None
        return out


@dataclass
class Fault:
    op: str
    kind: str  # status | drop | commit_then_drop | delay | stall | commit_then_stall
    status: int = 500
    seconds: float = 0.0
    times: int = 1
    reached: threading.Event = field(default_factory=threading.Event)  # a stalled request is held
    release: threading.Event = field(default_factory=threading.Event)  # ...until this is set
    finished: threading.Event = field(default_factory=threading.Event)  # ...and logged in requests


@dataclass
class Request:
    method: str
    path: str
    op: str
    status: int | None  # None: the connection was dropped
    authorization: str | None


# op names: create_repo, info, tree, preupload, validate_yaml, lfs_batch, lfs_put, lfs_verify,
# commit, branch, resolve
WRITE_OPS = {"create_repo", "preupload", "lfs_batch", "lfs_put", "lfs_verify", "commit", "branch"}
# The LFS PUT goes to the href the batch answer gave (a presigned storage URL on the real Hub),
# without the Authorization header.
UNAUTHENTICATED_WRITES = {"lfs_put"}


class LoopbackHub:
    def __init__(self, token: str, port: int = 0):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self.in_flight = 0  # requests being handled
        self.idle = threading.Condition(self.lock)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> LoopbackHub:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self.lock:
            self.release_stalls()
            self.repos.clear()
            self.requests.clear()
            self.faults.clear()

    # -- faults -----------------------------------------------------------------------------
    def fail_next(self, op: str, status: int = 500, times: int = 1) -> None:
        self.faults.append(Fault(op, "status", status=status, times=times))

    def drop_connection_next(self, op: str, times: int = 1) -> None:
        """Close the connection half-way through reading the request body, without answering."""
        self.faults.append(Fault(op, "drop", times=times))

    def commit_then_drop_response(self, times: int = 1) -> None:
        """Apply the next commit, then close the connection without answering."""
        self.faults.append(Fault("commit", "commit_then_drop", times=times))

    def delay_next(self, op: str, seconds: float, times: int = 1) -> None:
        self.faults.append(Fault(op, "delay", seconds=seconds, times=times))

    def stall_next(self, op: str, after_commit: bool = False) -> Fault:
        """Hold the next ``op`` request (a commit: applied first when ``after_commit``) without an
        answer until ``fault.release`` is set, then close its connection; ``fault.reached`` is set
        when the request arrives. For a test to kill the client mid-request."""
        if after_commit and op != "commit":
            raise ValueError("after_commit applies to the commit only")
        fault = Fault(op, "commit_then_stall" if after_commit else "stall")
        self.faults.append(fault)
        return fault

    def wait_idle(self, timeout: float = 30) -> bool:
        """Wait until no request is being handled (each one handled is in ``requests``)."""
        with self.idle:
            return self.idle.wait_for(lambda: self.in_flight == 0, timeout)

    def release_stalls(self) -> None:
        for fault in list(self.faults):
            fault.release.set()

    def _take_fault(self, op: str, kinds: tuple[str, ...]) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.op == op and fault.kind in kinds:
                    fault.times -= 1
                    if fault.times <= 0:
                        self.faults.remove(fault)
                    return fault
        return None

    # -- what tests look at -----------------------------------------------------------------
    def commits(self, repo_id: str, branch: str = "main") -> list[Commit]:
        return self.repos[repo_id].history(branch)

    def files(self, repo_id: str, revision: str = "main") -> dict[str, StoredFile]:
        head = self.repos[repo_id].head(revision)
        return dict(head.files) if head else {}

    def file_bytes(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        repo = self.repos[repo_id]
        stored = repo.head(revision).files[path]
        return repo.lfs[stored.lfs_oid] if stored.lfs_oid else stored.content

    def state_changing_requests(self) -> list[Request]:
        return [r for r in self.requests if r.op in WRITE_OPS]

    def add_model(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """Put a model straight into the store (a source for ``qconv convert ORG/NAME``)."""
        with self.lock:
            repo = self.repos.get(repo_id) or self._create(repo_id, private=False)
            stored = {}
            for path, data in files.items():
                if _is_lfs(path, len(data)):
                    oid = hashlib.sha256(data).hexdigest()
                    repo.lfs[oid] = data
                    stored[path] = StoredFile(len(data), lfs_oid=oid)
                else:
                    stored[path] = StoredFile(len(data), content=data)
            return self._commit(repo, branch, stored, "add model", replace=True).sha

    # -- store ------------------------------------------------------------------------------
    def _create(self, repo_id: str, private: bool) -> Repo:
        repo = Repo(repo_id, private)
        self.repos[repo_id] = repo
        # The real Hub starts every repo with a commit holding .gitattributes.
        first = {".gitattributes": StoredFile(len(GITATTRIBUTES), content=GITATTRIBUTES)}
        self._commit(repo, "main", first, "initial commit")
        return repo

    def _commit(
        self, repo: Repo, branch: str, changes: dict[str, StoredFile], message: str, replace=False
    ) -> Commit:
        parent = repo.head(branch) if branch in repo.branches else None
        files = {} if replace or parent is None else dict(parent.files)
        if replace and ".gitattributes" in (parent.files if parent else {}):
            files[".gitattributes"] = parent.files[".gitattributes"]
        files.update(changes)
        digest = json.dumps(
            [parent.sha if parent else None, message, sorted((p, f.etag) for p, f in files.items())]
        )
        sha = hashlib.sha1(digest.encode()).hexdigest()
        commit = Commit(sha, parent.sha if parent else None, message, files)
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(".safetensors") or size > 10 * 1024 * 1024


class _Dropped(Exception):
    """Close the connection without a response."""


def _stall(handler, fault: Fault) -> None:
    """Say the request arrived, wait (at most a minute) to be let go, then drop the connection
    (``fault.finished`` is set once the request is in ``hub.requests``)."""
    handler._stalled = fault
    fault.reached.set()
    fault.release.wait(60)
    raise _Dropped


def _handler_for(hub: LoopbackHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        # -- plumbing -----------------------------------------------------------------------
        def _body(self, drop_half: bool = False) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                    if drop_half:
                        raise _Dropped
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length") or 0)
            if drop_half:
                self.rfile.read(length // 2)
                raise _Dropped
            return self.rfile.read(length)

        def _send(self, status: int, body=b"", headers: dict | None = None, head: bool = False) -> None:
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, str(value))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            self._status = status

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers, head=self.command == "HEAD")

        def _authorized(self, write: bool) -> bool:
            auth = self.headers.get("Authorization")
            if auth is None:
                return not write
            return auth == f"Bearer {hub.token}"

        def _dispatch(self) -> None:
            url = urlparse(self.path)
            self._query = parse_qs(url.query)
            path = unquote(url.path)
            self._status = None
            self._stalled = None
            with hub.lock:
                hub.in_flight += 1
            op, handler, args = _route(self.command, path)
            try:
                if handler is None:
                    self._body()
                    self._error(404, f"no route {self.command} {path}")
                    return
                fault = hub._take_fault(op, ("delay",))
                if fault:
                    time.sleep(fault.seconds)
                if not self._authorized(write=op in WRITE_OPS - UNAUTHENTICATED_WRITES):
                    self._body()
                    self._error(401, "Invalid credentials in Authorization header")
                    return
                if hub._take_fault(op, ("drop",)):
                    self._body(drop_half=True)
                fault = hub._take_fault(op, ("stall",))
                if fault:
                    _stall(self, fault)
                fault = hub._take_fault(op, ("status",))
                if fault:
                    self._body()
                    self._error(fault.status, f"injected HTTP {fault.status}")
                    return
                getattr(self, handler)(*args)
            except _Dropped:
                self.close_connection = True
                self._status = None
            finally:
                with hub.lock:
                    hub.requests.append(
                        Request(
                            self.command, path, op or "?", self._status, self.headers.get("Authorization")
                        )
                    )
                    hub.in_flight -= 1
                    hub.idle.notify_all()
                if self._stalled is not None:
                    self._stalled.finished.set()

        do_GET = do_POST = do_PUT = do_HEAD = _dispatch

        # -- endpoints ----------------------------------------------------------------------
        def create_repo(self) -> None:
            payload = json.loads(self._body() or b"{}")
            repo_id = (
                f"{payload['organization']}/{payload['name']}"
                if payload.get("organization")
                else payload["name"]
            )
            with hub.lock:
                if repo_id in hub.repos:
                    # the real Hub names the existing repo's url, which create_repo(exist_ok=True) returns
                    message = "You already created this model repo"
                    body = {"error": message, "url": f"{hub.endpoint}/{repo_id}"}
                    self._send(409, body, {"X-Error-Message": message})
                    return
                hub._create(repo_id, bool(payload.get("private")))
            self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "Repository not found", "RepoNotFound")
            return repo

        def _commit_at(self, repo: Repo, revision: str) -> Commit | None:
            commit = repo.head(revision)
            if commit is None:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            return commit

        def info(self, repo_id: str, revision: str = "main") -> None:
            self._body()
            repo = self._repo(repo_id)
            commit = repo and self._commit_at(repo, revision)
            if commit is None:
                return
            siblings = []
            for name, stored in sorted(commit.files.items()):
                entry = {"rfilename": name}
                if self._query.get("blobs") == ["True"] or self._query.get("blobs") == ["true"]:
                    entry.update(size=stored.size, blobId=stored.blob_id)
                    if stored.lfs_oid:
                        entry["lfs"] = {
                            "size": stored.size,
                            "sha256": stored.lfs_oid,
                            "pointerSize": len(lfs_pointer(stored.lfs_oid, stored.size)),
                        }
                siblings.append(entry)
            readme = commit.files.get("README.md")
            card = _front_matter(readme.content) if readme and readme.content else {}
            self._send(
                200,
                {
                    "_id": repo_id,
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": commit.sha,
                    "private": repo.private,
                    "siblings": siblings,
                    "cardData": card,
                    "tags": [],
                },
            )

        def tree(self, repo_id: str, revision: str, prefix: str = "") -> None:
            self._body()
            repo = self._repo(repo_id)
            commit = repo and self._commit_at(repo, revision)
            if commit is None:
                return
            entries = []
            for name, stored in sorted(commit.files.items()):
                if prefix and not name.startswith(prefix.rstrip("/") + "/"):
                    continue
                entry = {"type": "file", "path": name, "oid": stored.blob_id, "size": stored.size}
                if stored.lfs_oid:
                    entry["lfs"] = {
                        "oid": stored.lfs_oid,
                        "size": stored.size,
                        "pointerSize": len(lfs_pointer(stored.lfs_oid, stored.size)),
                    }
                entries.append(entry)
            self._send(200, entries)

        def preupload(self, repo_id: str, revision: str) -> None:
            payload = json.loads(self._body())
            repo = self._repo(repo_id)
            if repo is None:
                return
            commit = repo.head(revision)
            files = []
            for item in payload["files"]:
                stored = commit.files.get(item["path"]) if commit else None
                lfs = _is_lfs(item["path"], item["size"])
                remote = None
                if stored is not None:
                    remote = stored.lfs_oid if lfs else stored.blob_id
                files.append(
                    {
                        "path": item["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": False,
                        "oid": remote,
                    }
                )
            self._send(200, {"files": files, "commitOid": commit.sha if commit else None})

        def validate_yaml(self) -> None:
            self._body()
            self._send(200, {"errors": [], "warnings": []})

        def lfs_batch(self, repo_id: str) -> None:
            payload = json.loads(self._body())
            repo = self._repo(repo_id)
            if repo is None:
                return
            objects = []
            for obj in payload["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in repo.lfs:
                    base = f"{hub.endpoint}/lfs/{repo_id}/{obj['oid']}"
                    entry["actions"] = {
                        "upload": {"href": base, "header": {}},
                        "verify": {"href": f"{base}/verify", "header": {}},
                    }
                objects.append(entry)
            self._send(
                200,
                {"transfer": "basic", "objects": objects},
                {"Content-Type": "application/vnd.git-lfs+json"},
            )

        def lfs_put(self, repo_id: str, oid: str) -> None:
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                self._error(400, "sha256 mismatch")
                return
            with hub.lock:
                hub.repos[repo_id].lfs[oid] = data
            self._send(200)

        def lfs_verify(self, repo_id: str, oid: str) -> None:
            self._body()
            repo = self._repo(repo_id)
            if repo is None:
                return
            if oid not in repo.lfs:
                self._error(404, "object not uploaded")
                return
            self._send(200, {})

        def commit(self, repo_id: str, revision: str) -> None:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            with hub.lock:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if revision not in repo.branches:
                    self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                    return
                header = lines[0]["value"]
                head = repo.head(revision)
                if header.get("parentCommit") and header["parentCommit"] != head.sha:
                    self._error(412, "A commit has happened since. Please refresh and try again.")
                    return
                changes = {}
                for line in lines[1:]:
                    value = line["value"]
                    if line["key"] == "file":
                        data = base64.b64decode(value["content"])
                        changes[value["path"]] = StoredFile(len(data), content=data)
                    elif line["key"] == "lfsFile":
                        if value["oid"] not in repo.lfs:
                            self._error(422, f"LFS object {value['oid']} was not uploaded")
                            return
                        changes[value["path"]] = StoredFile(value["size"], lfs_oid=value["oid"])
                    else:
                        self._error(400, f"unsupported operation {line['key']}")
                        return
                commit = hub._commit(repo, revision, changes, header.get("summary", ""))
            if hub._take_fault("commit", ("commit_then_drop",)):
                raise _Dropped
            fault = hub._take_fault("commit", ("commit_then_stall",))
            if fault:
                _stall(self, fault)
            self._send(
                200,
                {
                    "commitUrl": f"{hub.endpoint}/{repo_id}/commit/{commit.sha}",
                    "commitOid": commit.sha,
                    "success": True,
                },
            )

        def branch(self, repo_id: str, branch: str) -> None:
            payload = json.loads(self._body() or b"{}")
            with hub.lock:
                repo = self._repo(repo_id)
                if repo is None:
                    return
                if branch in repo.branches:
                    self._error(409, "Reference already exists")
                    return
                start = repo.head(payload.get("startingPoint") or "main")
                repo.branches[branch] = start.sha
            self._send(200, {})

        def resolve(self, repo_id: str, revision: str, filename: str) -> None:
            self._body()
            repo = self._repo(repo_id)
            commit = repo and self._commit_at(repo, revision)
            if commit is None:
                return
            stored = commit.files.get(filename)
            if stored is None:
                self._error(404, "Entry not found", "EntryNotFound")
                return
            data = repo.lfs[stored.lfs_oid] if stored.lfs_oid else stored.content
            headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{stored.etag}"'}
            if stored.lfs_oid:
                headers.update({"X-Linked-Etag": f'"{stored.lfs_oid}"', "X-Linked-Size": stored.size})
            self._send(200, data, headers, head=self.command == "HEAD")

    return Handler


REPO = r"(?P<repo>[^/]+/[^/]+?)"
ROUTES = [
    ("POST", r"/api/repos/create", "create_repo", "create_repo"),
    ("GET", rf"/api/models/{REPO}/revision/(?P<rev>[^/]+)", "info", "info"),
    ("GET", rf"/api/models/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<prefix>.*))?", "tree", "tree"),
    ("POST", rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", "preupload", "preupload"),
    ("POST", rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", "commit", "commit"),
    ("POST", rf"/api/models/{REPO}/branch/(?P<branch>[^/]+)", "branch", "branch"),
    ("GET", rf"/api/models/{REPO}", "info", "info"),
    ("POST", r"/api/validate-yaml", "validate_yaml", "validate_yaml"),
    ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", "lfs_batch", "lfs_batch"),
    ("POST", rf"/lfs/{REPO}/(?P<oid>[0-9a-f]{{64}})/verify", "lfs_verify", "lfs_verify"),
    ("PUT", rf"/lfs/{REPO}/(?P<oid>[0-9a-f]{{64}})", "lfs_put", "lfs_put"),
    ("GET", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "resolve", "resolve"),
    ("HEAD", rf"/{REPO}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", "resolve", "resolve"),
]


def _route(method: str, path: str) -> tuple[str | None, str | None, list[str]]:
    """(op name, handler method name, path arguments) of a request, or (None, None, [])."""
    for verb, pattern, op, name in ROUTES:
        match = re.fullmatch(pattern, path) if verb == method else None
        if match:
            values = list(match.groupdict().values())
            args = [v or "" for v in values] if name == "tree" else [v for v in values if v is not None]
            return op, name, args
    return None, None, []


def _front_matter(readme: bytes) -> dict:
    """The few top-level ``key: value`` pairs of a README's YAML front matter (enough for tests)."""
    text = readme.decode("utf-8", "replace")
    if not text.startswith("---\n"):
        return {}
    block = text[4:].split("\n---", 1)[0]
    out = {}
    for line in block.splitlines():
        if ":" in line and not line.startswith((" ", "-")):
            key, value = line.split(":", 1)
            if value.strip():
                out[key.strip()] = value.strip()
    return out
