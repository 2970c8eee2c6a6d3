"""``qconv push``: publish an artifact to a Hugging Face Hub repo, once.

The upload is huggingface_hub's own (``create_repo(exist_ok=True)``, ``upload_folder``), from a
staging folder of hard links to the artifact's files plus the model card written for the Hub, so
the artifact's hashed files are never touched. What makes it safe to run again, and after a fault:

- Before every attempt the remote head is read and its files compared with the artifact's: an
  LFS file by its oid (the sha256 the manifest records), a small file by its git blob id. When they
  all match, nothing is uploaded: pushing the same artifact again makes no commit.
- The client does not retry a commit answered with HTTP 500, and a commit whose response is lost
  (``RemoteProtocolError``) may exist on the Hub anyway (shared/HUB.md). So after any failure qconv
  reads the remote head again before retrying: if the files are there, that commit was ours.
  Each commit also names its parent (``parent_commit``), so a stale retry is refused by the Hub
  instead of stacking a second commit. Bounded retries, exponential backoff.
- A push killed outright (SIGKILL, a crash) is finished by running it again: the LFS files it
  uploaded are on the Hub already (the client's ``preupload``/LFS batch skips them), and a commit
  it made is found by the remote check above, so the second run commits at most once. The registry
  row is written only after the Hub holds the commit, once per commit sha, so the run that finds
  the killed run's commit records it (tests/test_push_resume.py).
- The token comes from ``HF_TOKEN`` or huggingface_hub's stored login, is handed to the client
  only, and is scrubbed from every error message qconv shows.
- A GGUF artifact joins the other file types of its repo (the Hub's convention: NAME-Q8_0.gguf,
  NAME-Q4_K_M.gguf... side by side): its manifest goes up as ``NAME-TYPE.qconv.json``, and the
  card is rebuilt at each attempt from every qconv GGUF manifest in the repo at the head that
  attempt builds on (tests/test_gguf_push.py). A repo whose card belongs to something else (a
  safetensors artifact, a card qconv did not write) is refused unless ``force``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from qconv.artifact import Artifact
from qconv.errors import (
    ArtifactError,
    HubError,
    NotVerifiedError,
    QconvError,
    QconvWarning,
    UsageError,
    literal,
)
from qconv.files import sha256_file
from qconv.formats import get_format
from qconv.manifest import MANIFEST_NAME, base_model_name, base_model_of, finite, parse_base_model
from qconv.model_card import gguf_hub_card, gguf_manifest_name, gguf_stem, hub_model_card
from qconv.registry import ResolvedArtifact, resolve_artifact

RETRY_ATTEMPTS = 4
RETRY_BACKOFF_S = 2.0  # doubled after each failed attempt
CARD_NAME = "README.md"
# Remote files an upload replaces wholesale: shards of an older artifact must not linger.
DELETE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
# A GGUF artifact's manifest in the repo: NAME-TYPE.qconv.json beside NAME-TYPE.gguf
GGUF_MANIFEST_SUFFIX = ".qconv.json"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
BRANCH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RETRYABLE_STATUS = {408, 409, 412, 423, 425, 429}


@dataclass
class UploadFile:
    name: str  # path in the repo
    path: Path  # where its bytes are (for ``data``: the staging folder's copy, once staged)
    size: int
    sha256: str
    data: bytes | None = None  # bytes written for this push rather than the artifact's file


@dataclass
class PushResult:
    artifact_id: str | None
    folder: Path
    repo: str
    revision: str
    status: str  # "committed", "unchanged" or "dry-run"
    files: list[dict[str, Any]]
    card: str
    commit_sha: str | None = None
    url: str | None = None
    attempts: int = 0
    recorded: bool = False
    errors: list[str] = field(default_factory=list)  # the faults retried past, token-free

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.artifact_id,
            "path": str(self.folder),
            "repo": self.repo,
            "revision": self.revision,
            "status": self.status,
            "commit_sha": self.commit_sha,
            "url": self.url,
            "attempts": self.attempts,
            "recorded": self.recorded,
            "retried_errors": self.errors,
            "files": self.files,
        }


def hub_token() -> str:
    """``HF_TOKEN``, else huggingface_hub's stored login."""
    from huggingface_hub import get_token

    token = os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise HubError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    return token


def upload_files(
    resolved: ResolvedArtifact, manifest_bytes: bytes | None = None, manifest_name: str = MANIFEST_NAME
) -> list[UploadFile]:
    """The artifact's files as the manifest lists them (its own README.md replaced by the Hub
    card), plus the manifest itself as ``manifest_name`` (``manifest_bytes`` instead of its
    file, when this push changes it); each checked to have the manifest's size."""
    out = []
    for name, entry in sorted(resolved.manifest.get("files", {}).items()):
        if name in (CARD_NAME, MANIFEST_NAME):
            continue
        path = resolved.path / name
        if not path.is_file():
            raise ArtifactError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["size"]:
            raise ArtifactError(f"{path}: size differs from the manifest (run qconv verify)")
        out.append(UploadFile(name, path, entry["size"], entry["sha256"]))
    manifest_path = resolved.path / MANIFEST_NAME
    if manifest_bytes is not None:
        digest = hashlib.sha256(manifest_bytes).hexdigest()
        out.append(UploadFile(manifest_name, manifest_path, len(manifest_bytes), digest, manifest_bytes))
    else:
        out.append(
            UploadFile(manifest_name, manifest_path, manifest_path.stat().st_size, sha256_file(manifest_path))
        )
    return out


def push(
    ref: str | Path,
    repo: str,
    *,
    registry=None,
    revision: str = "main",
    private: bool = False,
    dry_run: bool = False,
    force: bool = False,
    metrics: list[dict] | None = None,
    token: str | None = None,
    base_model: str | None = None,
) -> PushResult:
    """Publish the artifact ``ref`` (folder or registry id) to ``repo`` at ``revision``.

    ``metrics``: rows ``{"name", "value", "protocol"}`` for the card; default: the registry's.
    ``base_model``: ``ORG/NAME[@REVISION]`` named as the base model by this push's card and
    ``qconv.json`` (the artifact's folder and registry row are left as they are); default: the
    artifact's own. Without either, a :class:`QconvWarning` says the card names no base model.
    Records the commit in ``registry`` (recording the artifact first if it is not there yet)."""
    if not REPO_ID.match(repo):
        raise UsageError("{option} {value!r}: expected NAMESPACE/NAME", option="repo", value=repo)
    if not BRANCH.fullmatch(revision or ""):
        raise UsageError("{option} {value!r}: not a branch name", option="revision", value=revision)
    given_base = parse_base_model(base_model) if base_model is not None else None
    resolved = resolve_artifact(registry, ref)
    # the manifest checked as an artifact's (ArtifactError names the folder and what is wrong)
    resolved = replace(resolved, manifest=Artifact(resolved.path).manifest)
    pushed_manifest = None  # the bytes of qconv.json when this push changes it
    recorded_base = base_model_of(resolved.manifest)
    if given_base is not None and (
        recorded_base is None
        or recorded_base["repo_id"] != given_base["repo_id"]
        or given_base["revision"] not in (None, recorded_base.get("revision"))
    ):
        manifest = {**resolved.manifest, "base_model": given_base}
        pushed_manifest = (json.dumps(finite(manifest), indent=2) + "\n").encode("utf-8")
        resolved = replace(resolved, manifest=manifest)
    if resolved.verified is not True and not force:
        state = "failed verification" if resolved.verified is False else "was never verified"
        raise NotVerifiedError(
            f"{resolved.path}: the artifact {state}; run qconv verify, or push anyway with --force"
        )
    if metrics is None and resolved.id is not None:
        metrics = registry.get_artifact(resolved.id).get("metrics", [])
    metrics = [{"name": m["name"], "value": m["value"], "protocol": m.get("protocol")} for m in metrics or []]
    gguf = get_format(resolved.manifest["recipe"]["method"]).container == "gguf"
    if gguf:
        # NAME-TYPE.qconv.json beside NAME-TYPE.gguf, carrying the metrics the card shows, so
        # that a later push of another type into this repo rebuilds the card from the Hub alone
        manifest_name, delete_patterns = (
            gguf_manifest_name(resolved.manifest),
            _gguf_patterns(resolved.manifest),
        )
        if metrics:
            manifest = {**resolved.manifest, "metrics": metrics}
            pushed_manifest = (json.dumps(finite(manifest), indent=2) + "\n").encode("utf-8")
        card = gguf_hub_card([(resolved.manifest, metrics)], repo)
    else:
        manifest_name, delete_patterns = MANIFEST_NAME, DELETE_PATTERNS
        card = hub_model_card(resolved.manifest, metrics, repo=repo)
    files = upload_files(resolved, pushed_manifest, manifest_name)
    card_bytes = card.encode("utf-8")
    listing = [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in files]
    listing.append(
        {"name": CARD_NAME, "size": len(card_bytes), "sha256": hashlib.sha256(card_bytes).hexdigest()}
    )
    listing.sort(key=lambda f: f["name"])
    result = PushResult(resolved.id, resolved.path, repo, revision, "dry-run", listing, card)
    if dry_run:
        _warn_if_no_base_model(resolved)
        return result

    token = token or hub_token()
    if gguf:

        def card_at(api, head: str, remote: dict) -> bytes:
            entries = _gguf_entries(api, result.repo, head, remote, resolved.manifest, force)
            return gguf_hub_card([(resolved.manifest, metrics), *entries], repo).encode("utf-8")

    else:

        def card_at(api, head: str, remote: dict) -> bytes:
            return card_bytes

    with _staging(resolved.path, files, card_bytes) as staging:
        _upload(result, staging, files, card_at, private, token, _commit_message(resolved), delete_patterns)
    if not (gguf and result.card.startswith("---\nbase_model: ")):  # another type's may name one
        _warn_if_no_base_model(resolved)  # once the card is up (a failed push says its error alone)
    if registry is not None:
        if result.artifact_id is None:
            result.artifact_id = registry.record_artifact(resolved.manifest, resolved.path)
        result.recorded = _record(registry, result)
    return result


def _warn_if_no_base_model(resolved: ResolvedArtifact) -> None:
    if base_model_of(resolved.manifest) is None:
        warning = QconvWarning.about_option(
            f"{literal(resolved.path)}: no base model recorded, so the model card names none and the "
            "Hub links the repo to no base model; name it with {option} ORG/NAME",
            "base_model",
        )
        warnings.warn(warning, stacklevel=3)


def _gguf_patterns(manifest: dict) -> list[str]:
    """The remote files a GGUF push of this artifact replaces: its own ``NAME-TYPE.gguf`` or
    its gguf-split parts (a re-push split differently leaves no part behind); the other file
    types' files are left as they are."""
    stem = gguf_stem(manifest)
    return [f"{stem}.gguf", f"{stem}-*-of-*.gguf"]


def _gguf_entries(
    api, repo: str, head: str, remote: dict, manifest: dict, force: bool
) -> list[tuple[dict, list[dict]]]:
    """``[(manifest, metrics)]`` of the other qconv GGUF artifacts the repo holds at ``head``
    (their ``NAME-TYPE.qconv.json``, read at that very commit, and a ``qconv.json`` of a GGUF
    artifact pushed before manifests were named per file), for the card of all of them.
    Refuses (unless ``force``) a repo whose card and files belong to something else: a
    safetensors artifact of qconv, or weights and a card qconv did not write."""
    own = gguf_stem(manifest)
    found: dict[str, tuple[dict, list[dict]]] = {}
    for name in sorted(remote):
        if not name.endswith(GGUF_MANIFEST_SUFFIX) or "/" in name:
            continue
        other = _remote_manifest(repo, name, head, api)
        if get_format(other["recipe"]["method"]).container != "gguf":
            raise HubError(f"{repo}: {name} is not the manifest of a GGUF artifact")
        found[gguf_stem(other)] = (other, other.get("metrics") or [])
    legacy = None
    if MANIFEST_NAME in remote:
        legacy = _remote_manifest(repo, MANIFEST_NAME, head, api)
        if get_format(legacy["recipe"]["method"]).container == "gguf":
            found.setdefault(gguf_stem(legacy), (legacy, legacy.get("metrics") or []))
        elif not force:
            recipe = legacy["recipe"]
            raise HubError(
                f"{repo}: holds a {recipe.get('label') or recipe['method']} artifact (its README.md and "
                f"{MANIFEST_NAME}); a GGUF push would replace its model card: push to another repo, "
                "or mix them with --force"
            )
    if legacy is None and not found and not force:
        held = sorted(n for n in remote if n == CARD_NAME or n.endswith(".safetensors"))
        if held:
            raise HubError(
                f"{repo}: holds {', '.join(held[:3])}{' ...' if len(held) > 3 else ''}, not written by "
                "qconv; a GGUF push would replace its model card: push to another repo, or with --force"
            )
    found.pop(own, None)  # this push's own type: replaced by the artifact being pushed
    return [found[stem] for stem in sorted(found)]


def _remote_manifest(repo: str, name: str, revision: str, api) -> dict:
    """A manifest of the repo at commit ``revision``, downloaded through huggingface_hub."""
    from huggingface_hub import hf_hub_download

    path = hf_hub_download(repo, name, revision=revision, token=api.token, endpoint=api.endpoint)
    try:
        manifest = json.loads(Path(path).read_text(encoding="utf-8"))
        if get_format(manifest["recipe"]["method"]).container == "gguf":
            manifest["recipe"]["type"]  # noqa: B018 - what the card needs
    except (ValueError, KeyError, TypeError) as exc:
        raise HubError(f"{repo}: {name} at {revision[:12]} is not a qconv manifest ({exc})") from None
    return manifest


def _commit_message(resolved: ResolvedArtifact) -> str:
    recipe, source = resolved.manifest["recipe"], resolved.manifest["source"]
    entry = base_model_of(resolved.manifest)
    base = entry["repo_id"] if entry else base_model_name(source.get("kind"), source.get("ref"))
    return f"qconv: {recipe.get('label') or recipe['method']} of {base}"


def _record(registry, result: PushResult) -> bool:
    """Record the push unless this very commit is already recorded for this artifact."""
    rows = registry.get_artifact(result.artifact_id).get("pushes", [])
    for row in rows:
        if (row["repo"], row["revision"], row["commit_sha"]) == (
            result.repo,
            result.revision,
            result.commit_sha,
        ):
            return False
    registry.record_push(result.artifact_id, result.repo, result.revision, result.commit_sha, result.url)
    return True


class _staging:
    """A folder of hard links to the files (copies where links cannot be made) and the card,
    beside the artifact (same file system), removed afterwards. Its name carries the pid
    (``.NAME.qconv-push-PID-XXXX``): a push killed outright (SIGKILL, power loss) cannot remove
    its own, so the next push of the same artifact removes those whose process is gone."""

    def __init__(self, folder: Path, files: list[UploadFile], card: bytes):
        self.folder, self.files, self.card = folder, files, card

    def __enter__(self) -> Path:
        remove_stale_staging(self.folder)
        prefix = f".{self.folder.name}.qconv-push-{os.getpid()}-"
        try:
            self.path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.folder.parent))
        except OSError:
            self.path = Path(tempfile.mkdtemp(prefix=prefix.lstrip(".")))
        for f in self.files:
            target = self.path / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.data is not None:  # this push's own bytes: the upload compares and sends this copy
                target.write_bytes(f.data)
                f.path = target
                continue
            try:
                os.link(f.path, target)
            except OSError:
                shutil.copyfile(f.path, target)
        (self.path / CARD_NAME).write_bytes(self.card)
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders of ``folder`` left by pushes whose process no longer runs
    (those of a push still running are kept); returns the ones removed."""
    stale = []
    pattern = re.compile(re.escape(f".{folder.name}.qconv-push-") + r"(\d+)-")
    try:
        candidates = list(folder.parent.iterdir())
    except OSError:
        return stale
    for path in candidates:
        match = pattern.match(path.name)
        if match and path.is_dir() and not _process_alive(int(match[1])):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, owned by someone else
        return True
    return True


def _upload(
    result: PushResult,
    staging: Path,
    files: list[UploadFile],
    card_at,
    private: bool,
    token: str,
    message: str,
    delete_patterns: list[str],
) -> None:
    """Commit the staging folder on top of the remote head, once. ``card_at(api, head, remote
    files)`` gives the card for that head (a GGUF repo's card describes every type it holds at
    that commit), written into the staging folder before the files are compared."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    wanted = {f.name: (f.sha256, f.path) for f in files}
    failed_before = False
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        result.attempts = attempt
        try:
            if attempt == 1:
                api.create_repo(result.repo, private=private, exist_ok=True, repo_type="model")
                if result.revision != "main":
                    api.create_branch(result.repo, branch=result.revision, exist_ok=True, repo_type="model")
            head, remote = _remote_files(api, result.repo, result.revision)
            card = card_at(api, head, remote)
            (staging / CARD_NAME).write_bytes(card)
            result.card = card.decode("utf-8")
            wanted[CARD_NAME] = (hashlib.sha256(card).hexdigest(), staging / CARD_NAME)
            if _matches(remote, wanted, delete_patterns):
                # After a failure, a match means the failed attempt's commit did land.
                result.status = "committed" if failed_before else "unchanged"
                result.commit_sha = head
                result.url = f"{api.endpoint}/{result.repo}/commit/{head}"
                return
            info = api.upload_folder(
                repo_id=result.repo,
                folder_path=str(staging),
                revision=result.revision,
                commit_message=message,
                delete_patterns=delete_patterns,
                parent_commit=head,
                repo_type="model",
            )
        except QconvError:  # qconv's own refusal (the repo holds something else): said as it is
            raise
        except Exception as exc:  # noqa: BLE001 - classified below; anything else is re-raised
            transport = network_error(exc)
            if attempt == 1 and transport is not None and "Connect" in type(transport).__name__:
                # the very first request found no Hub (refused, unknown host): said at once, not
                # after 14 s of backoff; a fault later on (a dropped upload) is retried as before
                raise HubError(
                    scrub(unreachable(result.repo, transport) + "; nothing was pushed", token)
                ) from None
            if not is_retryable(exc) or attempt == RETRY_ATTEMPTS:
                raise HubError(_describe(exc, result.repo, token, attempt)) from None
            result.errors.append(_describe(exc, result.repo, token, attempt))
            failed_before = True
            time.sleep(RETRY_BACKOFF_S * 2 ** (attempt - 1))
            continue
        head, remote = _remote_files(api, result.repo, result.revision)
        if head != info.oid or not _matches(remote, wanted, delete_patterns):
            raise HubError(
                f"{result.repo}: after the commit {info.oid}, the remote files differ from the artifact"
            )
        result.status = "committed"
        result.commit_sha = info.oid
        result.url = f"{api.endpoint}/{result.repo}/commit/{info.oid}"
        return


def _remote_files(api, repo: str, revision: str) -> tuple[str, dict[str, tuple[str | None, str | None]]]:
    """The head commit of ``revision`` and ``{path: (lfs sha256 or None, git blob id)}``."""
    info = api.model_info(repo, revision=revision, files_metadata=True)
    files = {}
    for sibling in info.siblings or []:
        lfs = sibling.lfs.sha256 if sibling.lfs is not None else None
        files[sibling.rfilename] = (lfs, sibling.blob_id)
    return info.sha, files


def _matches(remote: dict, wanted: dict[str, tuple[str, Path]], delete_patterns: list[str]) -> bool:
    stale = [
        name for name in remote if name not in wanted and any(Path(name).match(p) for p in delete_patterns)
    ]
    if stale:
        return False
    for name, (sha256, path) in wanted.items():
        if name not in remote:
            return False
        lfs, blob_id = remote[name]
        if lfs is not None:
            if lfs != sha256:
                return False
        elif blob_id != _git_blob_sha1(path):
            return False
    return True


def _git_blob_sha1(path: Path) -> str:
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def is_retryable(exc: BaseException) -> bool:
    """Whether a Hub request failed in a way worth retrying (for a download, worth calling a
    network fault rather than a refusal): HTTP 5xx and conflicts, and transport failures (a dropped connection, a timeout) from
    whichever HTTP library this huggingface_hub uses (httpx in 1.x, httpx2 in 2.x)."""
    status = _status(exc)
    if status is not None:
        return status >= 500 or status in RETRYABLE_STATUS
    for cause in (exc, exc.__cause__, exc.__context__):
        if cause is None:
            continue
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return True
        if type(cause).__module__.split(".")[0] in (
            "httpx",
            "httpx2",
            "httpcore",
            "h11",
            "urllib3",
            "requests",
        ):
            return True
    return False


def network_error(exc: BaseException) -> BaseException | None:
    """The transport failure (refused connection, unknown host, timeout) behind ``exc``, if that
    is what it is: from whichever HTTP library this huggingface_hub uses, or the OS's own."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        module = type(exc).__module__.split(".")[0]
        if module in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and any(
            word in type(exc).__name__ for word in ("Connect", "Timeout", "NetworkError", "Proxy")
        ):
            return exc
        if isinstance(exc, (ConnectionRefusedError, TimeoutError)):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def unreachable(where: str, transport: BaseException) -> str:
    """``WHERE: cannot reach the Hub at ENDPOINT (why, as the OS says it)``."""
    from huggingface_hub import constants

    reason = re.sub(
        r"^\[Errno -?\d+\]\s*", "", str(transport).strip().splitlines()[0] if str(transport).strip() else ""
    )
    reason = reason or type(transport).__name__
    return f"{where}: cannot reach the Hub at {constants.ENDPOINT} ({reason})"


def _describe(exc: BaseException, repo: str, token: str, attempt: int) -> str:
    """One line, without the token or any Authorization header value."""
    status = _status(exc)
    if status is not None:
        server = getattr(exc, "server_message", None) or ""
        hint = " (the token was refused: check HF_TOKEN or `hf auth login`)" if status in (401, 403) else ""
        text = f"{repo}: the Hub answered HTTP {status}{hint}" + (f": {server}" if server else "")
    else:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        text = f"{repo}: {type(exc).__name__}" + (f": {detail}" if detail else "")
    if attempt > 1:
        text += f" (attempt {attempt})"
    return scrub(text, token)


def scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"(?i)(bearer\s+)\S+", r"\1***", text).splitlines()[0] if text else text
