"""The library surface: one object that converts, verifies, evaluates, pushes and releases, and
records what it did in its registry; the ``qconv`` command line is a thin layer over it.

    from qconv import Qconv

    api = Qconv(home="~/qconv-home", device="cpu")
    result = api.convert("models/tiny", "out/tiny-nf4", "bnb", {"bits": 4})
    api.verify(result.artifact_id)
    api.evaluate(result.artifact_id[:6], max_windows=8)
    model = api.load_model("out/tiny-nf4")

Every method that takes an artifact takes its registry id, a unique id prefix, or its folder
(:func:`qconv.registry.resolve_artifact`): an id whose folder is gone or now holds another
artifact is refused, and a folder is recorded against only if the registry knows the artifact
its own ``qconv.json`` describes. The registry (``home``/registry.db; ``home`` None:
``$QCONV_HOME``, else the user's data folder) is opened on first use and closed by
:meth:`Qconv.close` (or ``with``); loading or converting without recording never opens it.
``qconv.convert``, ``qconv.verify``... are the methods of one default instance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qconv.evaluate import DEFAULT_SEQLEN, EvalResult, evaluate
from qconv.hub import PushResult, push
from qconv.loader import load_model
from qconv.pipeline import ConvertResult, convert, stopped_leaves_unrecorded
from qconv.progress import NO_PROGRESS, ProgressSink
from qconv.registry import Registry, ResolvedArtifact, is_path_ref, open_registry, registry_path
from qconv.registry import resolve_artifact as resolve_in
from qconv.release import ReleasePlan, ReleaseReport, load_plan, release
from qconv.report_html import check_report_path, write_verify_report
from qconv.ui import DEFAULT_HOST, DEFAULT_PORT, RegistryUIServer, make_server
from qconv.verify import VerifyReport, run_verify


class Qconv:
    """``home``: the folder of the registry (default ``$QCONV_HOME``, else the user's data
    folder); ``device``: where to compute unless a call says otherwise (``auto``, ``cpu``,
    ``cuda``, ``cuda:N``); ``progress``: a :class:`qconv.progress.ProgressSink` for long stages."""

    def __init__(
        self, home: str | Path | None = None, device: str = "auto", progress: ProgressSink | None = None
    ):
        self.home = Path(home).expanduser() if home is not None else None
        self.device = device
        self.progress = progress or NO_PROGRESS
        self._registry: Registry | None = None

    def __repr__(self) -> str:
        return f"<Qconv home={str(self.home) if self.home else None!r} device={self.device!r}>"

    # -- the registry -------------------------------------------------------------------------
    @property
    def registry(self) -> Registry:
        """This instance's registry, opened (created, upgraded) on first use."""
        if self._registry is None:
            self._registry = open_registry(registry_path(self.home))
        return self._registry

    def open_registry(self) -> Registry:
        """A registry connection of its own at this instance's home, for the caller to close."""
        return open_registry(registry_path(self.home))

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def __enter__(self) -> Qconv:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def resolve(self, ref: str | Path) -> ResolvedArtifact:
        """The artifact ``ref`` (id, unique id prefix, or path) names: folder, id, manifest."""
        return resolve_in(self.registry, ref)

    # -- the work -----------------------------------------------------------------------------
    def convert(
        self,
        source: str | Path,
        output: str | Path,
        method: str | None = None,
        options: dict[str, Any] | None = None,
        *,
        skip: tuple[str, ...] | list[str] = (),
        dtype: str = "auto",
        max_shard_size: str | int | None = None,
        force: bool = False,
        verify: bool = True,
        logits: bool | None = None,
        max_rel_error: float | None = None,
        resume: bool = False,
        record: bool = True,
        device: str | None = None,
        base_model: str | None = None,
    ) -> ConvertResult:
        """Quantize ``source`` (a model folder, a ``.gguf``, a Hub id[@revision]) with ``method``
        and its ``options`` into the folder ``output`` (or import a folder already quantized with
        HQQ: ``method`` None), verify it, and record it (``record``): ``result.artifact_id``.
        ``base_model``: the Hub model ``ORG/NAME[@REVISION]`` it is a quantized version of
        (default: what the source says, if anything)."""
        # opened first: a registry that cannot be opened fails before the conversion, not after
        registry = self.registry if record else None
        if registry is not None:
            registry.check_writable()  # a newer qconv's registry: refused before hours of work
        result = convert(
            str(source),
            output,
            method,
            options,
            skip=skip,
            device=device or self.device,
            dtype=dtype,
            max_shard_size=max_shard_size,
            force=force,
            verify=verify,
            logits=logits,
            max_rel_error=max_rel_error,
            resume=resume,
            progress=self.progress,
            base_model=base_model,
        )
        if registry is not None:
            with stopped_leaves_unrecorded(result.path):
                result.artifact_id = registry.record_artifact(result.manifest, Path(result.path).resolve())
        return result

    def verify(
        self,
        ref: str | Path,
        *,
        source: str | None = None,
        max_rel_error: float | None = None,
        logits: bool = True,
        device: str | None = None,
        record: bool = False,
    ) -> VerifyReport:
        """Check the artifact ``ref`` (file hashes, every layer's error against ``source``,
        default the manifest's, and the real loader's logits); the result is stored on its
        registry row when it has one. ``record``: record a folder the registry does not know yet
        (an artifact converted with ``record=False``, or whose recording was interrupted) first;
        ``report.artifact_id`` is then its id."""
        artifact = self.resolve(ref)
        if artifact.id is not None or record:
            self.registry.check_writable()
        report = run_verify(
            artifact.path,
            source,
            device=device or self.device,
            max_rel_error=max_rel_error,
            logits=logits,
            progress=self.progress,
        )
        ident = artifact.id
        if ident is None and record:
            # run_verify has read the folder as an artifact: its manifest is there
            ident = self.registry.record_artifact(artifact.manifest, artifact.path.resolve())
        if ident is not None:
            self.registry.set_verify(ident, report.manifest_entry())
        report.artifact_id = ident
        return report

    def evaluate(
        self,
        ref: str | Path,
        *,
        text: str | Path | None = None,
        seqlen: int = DEFAULT_SEQLEN,
        max_windows: int | None = None,
        kl: bool = False,
        source: str | None = None,
        dtype: str | None = None,
        record: bool = True,
        device: str | None = None,
    ) -> EvalResult:
        """Perplexity of ``ref`` (an artifact, any folder ``load_model`` loads, or a ``.gguf``) on
        ``text`` (default: the WikiText-2 test text shipped with qconv), and with ``kl`` its KL
        divergence from the source and top-1 agreement (:mod:`qconv.evaluate`). Recorded on the
        artifact's registry row, when it has one and ``record``."""
        artifact = self.resolve(ref)
        if record and artifact.id is not None:
            self.registry.check_writable()
        result = evaluate(
            artifact.path,
            text=text,
            seqlen=seqlen,
            max_windows=max_windows,
            kl=kl,
            source=source,
            device=device or self.device,
            dtype=dtype,
            progress=self.progress,
        )
        result.artifact_id = artifact.id
        if record and artifact.id is not None:
            self.registry.record_metrics(artifact.id, result.metrics, result.protocol)
            result.recorded = True
        return result

    def push(
        self,
        ref: str | Path,
        repo: str,
        *,
        revision: str = "main",
        private: bool = False,
        dry_run: bool = False,
        force: bool = False,
        token: str | None = None,
        base_model: str | None = None,
    ) -> PushResult:
        """Publish the artifact ``ref`` to the Hub repo ``repo`` at ``revision`` with its model
        card (the registry's metrics); the commit is recorded. Refused for an artifact that did
        not pass verification unless ``force``. The token: ``token``, else HF_TOKEN or the
        stored login. ``base_model``: the Hub model ``ORG/NAME[@REVISION]`` the card and the pushed
        ``qconv.json`` name for this push (default: the artifact's own, if it has one)."""
        if not dry_run:
            self.registry.check_writable()  # before the upload, not after it
        return push(
            ref,
            repo,
            registry=self.registry,
            revision=revision,
            private=private,
            dry_run=dry_run,
            force=force,
            token=token,
            base_model=base_model,
        )

    def release(
        self, plan: str | Path | ReleasePlan, *, dry_run: bool = False, on_entry=None
    ) -> ReleaseReport:
        """Run a release plan (a TOML file or a loaded :class:`qconv.release.ReleasePlan`):
        convert -> verify -> eval -> gate -> push for every entry; ``on_entry(result)`` as each
        one ends. The plan's own ``device`` is used."""
        if not isinstance(plan, ReleasePlan):
            plan = load_plan(plan)
        if not dry_run:
            self.registry.check_writable()
        return release(plan, registry=self.registry, dry_run=dry_run, on_entry=on_entry)

    def load_model(self, ref: str | Path, device: str | None = None, dtype=None):
        """The artifact ``ref`` (or another HQQ / bitsandbytes / EETQ folder) as a runnable
        transformers model in eval mode (:func:`qconv.loader.load_model`). A folder is loaded
        without opening the registry."""
        path = Path(ref).expanduser() if is_path_ref(ref) else self.resolve(ref).path
        return load_model(path, device=device or self.device, dtype=dtype)

    # -- pages for people ---------------------------------------------------------------------
    def check_report_path(self, path: str | Path) -> Path:
        """Refuse (UsageError) a path :meth:`write_verify_report` could not write: call it before
        the verify work, so that a typo costs nothing (:mod:`qconv.report_html`)."""
        return check_report_path(path)

    def write_verify_report(self, path: str | Path, report: VerifyReport | dict[str, Any]) -> Path:
        """A verify result as one self-contained HTML page at ``path``: the checks, the loader's
        result, the per-layer error chart and the files (:mod:`qconv.report_html`)."""
        return write_verify_report(path, report.to_dict() if isinstance(report, VerifyReport) else report)

    def ui_server(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> RegistryUIServer:
        """This instance's registry as web pages, read-only, on ``host``:``port`` (0: any free
        port; ``server.url`` says which): ``serve_forever()`` runs it (:mod:`qconv.ui`)."""
        return make_server(registry_path(self.home), host, port)
