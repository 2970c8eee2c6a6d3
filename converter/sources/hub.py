"""A Hub model as a source: ``ORG/NAME[@REVISION]``.

The revision (default ``main``) is resolved to a commit sha first, then the files a conversion
needs (config, tokenizer and generation files, the model card for its licence, the safetensors
index and shards) are fetched one by one with ``hf_hub_download`` at that sha into
huggingface_hub's cache, and the snapshot folder is read like any local folder. The manifest
records kind ``hub``, the repo id and the commit sha. With ``HF_HUB_OFFLINE=1`` the revision is
resolved and the files read from the cache alone.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qconv.errors import SourceError, SourceNotFoundError
from qconv.hub import is_retryable, network_error, scrub, unreachable
from qconv.manifest import BaseModelEntry
from qconv.sources.hf_folder import HFFolderSource

HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?$")
# Files beside the weights that a conversion copies or reads (others are not fetched).
SUPPORT_FILES = {
    "config.json",
    "generation_config.json",
    "README.md",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "chat_template.json",
    "chat_template.jinja",
}
INDEX = "model.safetensors.index.json"


def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` for ``ORG/NAME[@REVISION]``, else None."""
    match = HUB_REF.match(ref)
    if match is None or match["repo"].endswith((".gguf", ".safetensors")):
        return None
    return match["repo"], match["revision"]


def is_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


class HubSource(HFFolderSource):
    kind = "hub"

    def __init__(self, repo_id: str, revision: str | None = None, *, folder: Path | None = None):
        """``folder``: a snapshot already in the cache (:func:`cached_snapshot`), read as it is."""
        self.requested = f"{repo_id}@{revision}" if revision else repo_id
        if folder is None:
            folder = _from_cache(repo_id, revision) if is_offline() else _download(repo_id, revision)
        super().__init__(folder)
        self.ref = repo_id
        self.revision = folder.name  # the snapshot folder is named after the commit sha

    def base_model(self) -> BaseModelEntry | None:
        return {"repo_id": self.ref, "revision": self.revision, "origin": "hub"}


def cached_snapshot(repo_id: str, revision: str, names: list[str]) -> Path | None:
    """The cache's snapshot folder of ``repo_id`` at ``revision`` (a commit sha: what a manifest
    records) when it holds every file of ``names``, else None. No request: a commit never
    changes, so what the cache holds for it is exactly what the Hub would send."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cached, str):
        return None
    folder = Path(cached).parent
    return folder if all((folder / name).is_file() for name in names) else None


def _wanted(names: list[str], repo: str) -> list[str]:
    top = [n for n in names if "/" not in n]
    weights = [n for n in top if n.endswith(".safetensors")]
    if not weights:
        other = [n for n in top if n.endswith((".bin", ".pt", ".pth", ".gguf"))]
        extra = f" (only {other[0]}...; qconv reads safetensors only)" if other else ""
        raise SourceError(f"{repo}: no safetensors weights in the repo{extra}")
    support = [n for n in top if n in SUPPORT_FILES or n.endswith(".jinja")]
    if "config.json" not in support:
        raise SourceError(f"{repo}: no config.json (not a transformers model repo)")
    return sorted(support) + ([INDEX] if INDEX in top else [])


def _download(repo_id: str, revision: str | None) -> Path:
    import json

    from huggingface_hub import HfApi, hf_hub_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    with _hub_errors(where):
        # The repo's listing first: one request that the client does not retry, so an unreachable
        # Hub is said at once (hf_hub_download retries a refused connection five times over ~25 s
        # before it falls back to the cache), and a repo without config.json is told apart from it.
        api = HfApi()
        info = api.model_info(repo_id, revision=revision)
        names = [s.rfilename for s in info.siblings or []]
        wanted = _wanted(names, where)
        # config.json at the requested revision: its path names the commit, and the cache records
        # revision -> commit, which offline mode resolves later.
        config = Path(hf_hub_download(repo_id, "config.json", revision=revision))
        sha = config.parent.name
        if sha != info.sha:  # the branch moved between the two requests: list that commit
            names = [s.rfilename for s in api.model_info(repo_id, revision=sha).siblings or []]
            wanted = _wanted(names, where)
        for name in wanted:
            hf_hub_download(repo_id, name, revision=sha)
        folder = config.parent
        if (folder / INDEX).is_file():
            try:
                shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise SourceError(f"{where}: {INDEX} is not a valid safetensors index") from exc
        else:
            shards = (
                ["model.safetensors"]
                if "model.safetensors" in names
                else [n for n in names if "/" not in n and n.endswith(".safetensors")]
            )
        for name in shards:
            hf_hub_download(repo_id, name, revision=sha)
    return folder


def snapshot_without_weights(repo_id: str, revision: str | None) -> tuple[Path, dict[str, dict]]:
    """For ``qconv release --dry-run``: the snapshot folder (named by the commit sha) holding the
    files a conversion fetches except the safetensors shards (fetched as :func:`_download` fetches
    them), and the shards' ``{name: {"sha256", "size"}}`` without their bytes: as the Hub lists
    them (an LFS file's oid is the sha256 of its bytes), or offline as the cache names them (a
    cached LFS blob is named by that oid). ``sha256`` None: not known without reading the file."""
    from huggingface_hub import HfApi, hf_hub_download

    where = f"{repo_id}@{revision}" if revision else repo_id
    with _hub_errors(where):
        if is_offline():
            folder = _from_cache(repo_id, revision)
            listed = {}
        else:
            api = HfApi()
            info = api.model_info(repo_id, revision=revision, files_metadata=True)
            _wanted([s.rfilename for s in info.siblings or []], where)  # what a conversion refuses
            folder = Path(hf_hub_download(repo_id, "config.json", revision=revision)).parent
            if folder.name != info.sha:  # the branch moved between the two requests
                info = api.model_info(repo_id, revision=folder.name, files_metadata=True)
            listed = {s.rfilename: s for s in info.siblings or []}
            for name in _wanted(list(listed), where):
                hf_hub_download(repo_id, name, revision=folder.name)
        if (folder / INDEX).is_file():
            try:
                shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise SourceError(f"{where}: {INDEX} is not a valid safetensors index") from exc
        else:
            names = list(listed) or [p.name for p in folder.iterdir()]
            shards = (
                ["model.safetensors"]
                if "model.safetensors" in names
                else sorted(n for n in names if "/" not in n and n.endswith(".safetensors"))
            )
    weights = {}
    for name in shards:
        sibling = listed.get(name)
        if sibling is not None:
            lfs = sibling.lfs
            weights[name] = {
                "sha256": lfs.sha256 if lfs is not None else None,
                "size": lfs.size if lfs is not None else sibling.size,
            }
            continue
        path = folder / name
        blob = Path(os.path.realpath(path)).name if path.is_file() else ""
        weights[name] = {
            "sha256": blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None,
            "size": path.stat().st_size if path.is_file() else None,
        }
    return folder, weights


def _from_cache(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import try_to_load_from_cache

    where = f"{repo_id}@{revision}" if revision else repo_id
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if not isinstance(cached, str):
        raise SourceNotFoundError(
            f"{where}: not in the Hugging Face cache, and HF_HUB_OFFLINE is set (no download)"
        )
    return Path(cached).parent


class _hub_errors:
    """huggingface_hub's errors as qconv's one-line ones (without the token)."""

    def __init__(self, where: str):
        self.where = where

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is None or isinstance(exc, SourceError):
            return False
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = self.where
        transport = network_error(exc)
        if transport is not None:  # before EntryNotFoundError: the client says a failed
            # connection as LocalEntryNotFoundError ("not in the cache"), a subclass of it
            raise SourceError(
                unreachable(where, transport)
                + "; to use a copy in the local Hugging Face cache without the network, set HF_HUB_OFFLINE=1"
            ) from None
        if isinstance(exc, RevisionNotFoundError):
            raise SourceNotFoundError(f"{where}: no such revision in the repo") from None
        if isinstance(exc, RepositoryNotFoundError):
            raise SourceNotFoundError(
                f"{where}: no such model repo on the Hub (or no access to it)"
            ) from None
        if isinstance(exc, EntryNotFoundError):
            raise SourceError(f"{where}: no config.json (not a transformers model repo)") from None
        if isinstance(exc, HfHubHTTPError):
            status = getattr(getattr(exc, "response", None), "status_code", "?")
            raise SourceError(scrub(f"{where}: the Hub answered HTTP {status}", _token())) from None
        if is_retryable(exc):
            raise SourceError(f"{where}: cannot reach the Hub ({type(exc).__name__})") from None
        return False


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()
