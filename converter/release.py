"""``qconv release PLAN.toml``: convert -> verify -> eval -> gate -> push, for every recipe of a plan.

A plan (see examples/release-smollm2.toml) names a base model, a matrix of recipes, gates and a
repo-name template. Each entry runs on its own: a failure (bad options, a failed verification, a
gate, the Hub) is reported and the next entry runs. Running the plan again is how to resume:

- an entry whose artifact (same source files, same recipe) was already pushed to the same repo and
  revision is skipped, with no conversion and no request to the Hub;
- an entry whose verified artifact exists (converted, not yet pushed: a crash or a failed push)
  resumes from that artifact instead of converting again.

The source is opened once and pinned: a Hub base is resolved to one commit for every entry.

Matching an entry to earlier artifacts compares the source's files (names, sizes, sha256) with
those the registry recorded. The real run hashes every file wholly. ``--dry-run`` does not read
the weights (minutes for an 8B model): a Hub base's shards are known by the sha256 the Hub lists
for them (their LFS oid; no download), a local file's by the hash qconv remembered when it last
hashed it, if the file's stat and first and last MiB are as they were then
(:mod:`qconv.fingerprints` says why that is safe); the small files beside them are hashed. A weight
file qconv cannot vouch for that way (never hashed here, or changed since) is compared by size
only, and an entry it could match says ``would-check``: the run hashes the source first, then
skips, resumes or converts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qconv.errors import QconvError, UsageError, literal
from qconv.evaluate import DEFAULT_SEQLEN, EvalResult, evaluate, evaluate_source, is_shipped_text
from qconv.files import hash_file
from qconv.fingerprints import recall
from qconv.formats import get_format
from qconv.hub import push
from qconv.manifest import parse_base_model
from qconv.pipeline import convert, stopped_leaves_unrecorded
from qconv.sources import WEIGHT_SUFFIXES, open_source, support_file_names
from qconv.sources.hub import INDEX, parse_hub_ref, snapshot_without_weights

ENTRY_KEYS = {"label", "method", "options", "skip", "gates"}
GATE_KEYS = {"max_layer_error", "max_ppl_increase"}
# text None: the WikiText-2 test text shipped with qconv, as `qconv eval` measures by default
EVAL_DEFAULTS = {"text": None, "seqlen": DEFAULT_SEQLEN, "max_windows": 8}


@dataclass
class Entry:
    label: str
    method: str
    options: dict[str, Any]
    skip: list[str]
    gates: dict[str, float]
    repo: str = ""
    output: Path = Path()


@dataclass
class ReleasePlan:
    path: Path
    base: str
    namespace: str
    repo_template: str
    output_dir: Path
    device: str
    private: bool
    revision: str
    gates: dict[str, float]
    eval: dict[str, Any]
    entries: list[Entry]
    base_model: str | None = None  # ORG/NAME[@REVISION] for every entry; None: detected from base


@dataclass
class EntryResult:
    label: str
    repo: str
    recipe: dict[str, Any] = field(default_factory=dict)
    # released | unchanged | skipped | failed | would-run | would-resume | would-skip | would-check
    status: str = "pending"
    stage: str | None = None  # where it failed
    message: str = ""
    artifact_id: str | None = None
    path: str | None = None
    resumed: bool = False
    commit_sha: str | None = None
    url: str | None = None
    worst_layer_error: float | None = None
    ppl: float | None = None
    ppl_source: float | None = None
    ppl_increase: float | None = None


@dataclass
class ReleaseReport:
    plan: str
    base: str
    source_kind: str
    source_revision: str | None
    entries: list[EntryResult]

    @property
    def failed(self) -> list[EntryResult]:
        return [e for e in self.entries if e.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "plan": self.plan,
            "base": self.base,
            "source_kind": self.source_kind,
            "source_revision": self.source_revision,
            "entries": [asdict(e) for e in self.entries],
            "failed": len(self.failed),
        }


# -- the plan ---------------------------------------------------------------------------------
def load_plan(path: str | Path) -> ReleasePlan:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise UsageError("qconv release needs Python 3.11 or later (tomllib)") from None
    path = Path(path).expanduser()
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the plan ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: not valid TOML ({exc})") from None
    where = str(path)

    def need(key: str, kind=str):
        value = doc.get(key)
        if not isinstance(value, kind) or (kind is str and not value):
            raise UsageError(f"{where}: '{key}' is required ({kind.__name__})")
        return value

    base = need("base")
    local = (path.parent / base).expanduser()
    if not Path(base).is_absolute() and local.exists():
        base = str(local)  # a relative path is relative to the plan
    namespace = need("namespace")
    base_model = doc.get("base_model")
    if base_model is not None:
        if not isinstance(base_model, str):
            raise UsageError(f"{where}: 'base_model' must be a string, ORG/NAME or ORG/NAME@REVISION")
        try:
            parse_base_model(base_model)
        except UsageError as exc:
            raise UsageError(f"{where}: " + literal(exc)) from None
    template = doc.get("repo", "{namespace}/{base_name}-{label}")
    gates = _gates(doc.get("gates", {}), f"{where}: [gates]")
    settings = {**EVAL_DEFAULTS, **doc.get("eval", {})}
    unknown = set(settings) - set(EVAL_DEFAULTS)
    if unknown:
        raise UsageError(f"{where}: [eval] has unknown key {sorted(unknown)[0]!r}")
    if settings["text"] and not is_shipped_text(settings["text"]):
        settings["text"] = str((path.parent / settings["text"]).expanduser())
    output_dir = (path.parent / doc.get("output_dir", "release-out")).expanduser()
    matrix = doc.get("matrix")
    if not isinstance(matrix, list) or not matrix:
        raise UsageError(f"{where}: at least one [[matrix]] entry is needed")
    base_name = base_name_of(base)
    entries, seen = [], set()
    for index, raw in enumerate(matrix, 1):
        here = f"{where}: [[matrix]] entry {index}"
        if not isinstance(raw, dict) or not raw.get("method") or not raw.get("label"):
            raise UsageError(f"{here}: 'label' and 'method' are required")
        unknown = set(raw) - ENTRY_KEYS
        if unknown:
            raise UsageError(f"{here}: unknown key {sorted(unknown)[0]!r}")
        if raw["label"] in seen:
            raise UsageError(f"{here}: label {raw['label']!r} is used twice")
        seen.add(raw["label"])
        entry = Entry(
            label=raw["label"],
            method=raw["method"],
            options=dict(raw.get("options", {})),
            skip=list(raw.get("skip", [])),
            gates={**gates, **_gates(raw.get("gates", {}), here)},
        )
        fields = {
            "namespace": namespace,
            "base_name": base_name,
            "label": entry.label,
            "method": entry.method,
        }
        fields["bits"] = entry.options.get("bits", "")
        try:
            entry.repo = template.format(**fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise UsageError(f"{where}: repo template {template!r}: unknown field {exc}") from None
        entry.output = output_dir / entry.repo.split("/")[-1]
        entries.append(entry)
    return ReleasePlan(
        path=path,
        base=base,
        namespace=namespace,
        repo_template=template,
        output_dir=output_dir,
        device=doc.get("device", "auto"),
        private=bool(doc.get("private", False)),
        revision=doc.get("revision", "main"),
        gates=gates,
        eval=settings,
        entries=entries,
        base_model=base_model,
    )


def _gates(raw: Any, where: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise UsageError(f"{where}: gates must be a table")
    unknown = set(raw) - GATE_KEYS
    if unknown:
        raise UsageError(
            f"{where}: unknown gate {sorted(unknown)[0]!r} (known: {', '.join(sorted(GATE_KEYS))})"
        )
    for key, value in raw.items():
        if not isinstance(value, (int, float)) or value < 0:
            raise UsageError(f"{where}: {key} must be a number >= 0")
    return {k: float(v) for k, v in raw.items()}


def base_name_of(base: str) -> str:
    hub = parse_hub_ref(base) if not Path(base).exists() else None
    if hub is not None:
        return hub[0].split("/")[-1]
    path = Path(base)
    return path.stem if path.suffix == ".gguf" else path.name


# -- running it -------------------------------------------------------------------------------
def release(plan: ReleasePlan, *, registry, dry_run: bool = False, on_entry=None) -> ReleaseReport:
    """Run every entry of ``plan``; ``on_entry(result)`` is called as each one ends."""
    if dry_run:
        kind, revision, source_files = dry_run_source_files(plan.base)
        convert_ref = plan.base
    else:
        with open_source(plan.base) as source:
            kind, revision = source.kind, source.revision
            source_files = source.file_hashes()
            # a Hub base is pinned to the commit it resolved to now, for every entry
            convert_ref = f"{source.ref}@{revision}" if kind == "hub" else plan.base
    report = ReleaseReport(str(plan.path), plan.base, kind, revision, [])
    evaluator = Evaluator(plan, convert_ref)
    for entry in plan.entries:
        result = EntryResult(entry.label, entry.repo)
        try:
            _run_entry(plan, entry, result, registry, source_files, convert_ref, evaluator, dry_run)
        except QconvError as exc:
            result.status, result.message = "failed", str(exc).strip().splitlines()[0]
        except Exception as exc:  # noqa: BLE001 - one entry's crash must not stop the others
            result.status = "failed"
            result.message = (
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            )
        report.entries.append(result)
        if on_entry:
            on_entry(result)
    return report


def _run_entry(plan, entry, result, registry, source_files, convert_ref, evaluator, dry_run) -> None:
    result.stage = "plan"
    fmt = get_format(entry.method)
    made = fmt.make_recipe(dict(entry.options))
    result.recipe = made
    released, reusable, unknown = _find(registry, entry, made, source_files, plan.revision)
    if dry_run and unknown is not None and (released or reusable):
        result.status, result.stage = "would-check", None
        result.message = (
            f"{unknown} changed since qconv last hashed it, or was never hashed here: the run hashes "
            f"the source, then {'skips' if released else 'resumes'} this entry if it is unchanged"
        )
        return
    if released is not None:
        result.status = "would-skip" if dry_run else "skipped"
        result.stage = None
        result.artifact_id, result.path = released["id"], released["path"]
        result.commit_sha, result.url = released["push"]["commit_sha"], released["push"]["url"]
        result.message = "already released from this source and recipe"
        return
    if dry_run:
        result.status, result.stage = ("would-resume" if reusable else "would-run"), None
        result.artifact_id = reusable["id"] if reusable else None
        return

    if reusable is not None:
        result.resumed = True
        result.artifact_id, result.path = reusable["id"], reusable["path"]
        manifest = reusable["manifest"]
    else:
        result.stage = "convert"
        converted = convert(
            convert_ref,
            entry.output,
            entry.method,
            entry.options,
            skip=entry.skip,
            device=plan.device,
            force=True,
            verify=True,
            base_model=plan.base_model,
        )
        with stopped_leaves_unrecorded(converted.path):
            converted.artifact_id = registry.record_artifact(
                converted.manifest, Path(converted.path).resolve()
            )
        result.artifact_id, result.path, manifest = (
            converted.artifact_id,
            str(converted.path),
            converted.manifest,
        )
        result.stage = "verify"
        if converted.report is None or not converted.report.passed:
            failed = [c for c in converted.report.checks if not c["passed"]] if converted.report else []
            detail = f"{failed[0]['name']}: {failed[0]['detail']}" if failed else "not run"
            raise QconvError(f"verification failed ({detail})")
    result.recipe = manifest["recipe"]

    result.stage = "gate"
    worst = manifest["summary"].get("worst_rel_error")
    result.worst_layer_error = worst
    limit = entry.gates.get("max_layer_error")
    if limit is not None and (worst is None or worst > limit):
        raise QconvError(f"worst layer error {worst:.4g} > max_layer_error {limit:g}")

    result.stage = "eval"
    measured, source = evaluator.measure(result.path, manifest)
    result.ppl, result.ppl_source = measured.metrics["ppl"], source.metrics["ppl"]
    result.ppl_increase = result.ppl / result.ppl_source - 1
    registry.record_metrics(result.artifact_id, measured.metrics, measured.protocol)
    registry.record_metrics(result.artifact_id, source_metrics(source), source.protocol)
    # the card shows the two perplexities the gate compared
    rows = [
        {"name": "ppl", "value": result.ppl, "protocol": measured.protocol},
        {"name": "ppl_source", "value": result.ppl_source, "protocol": source.protocol},
    ]

    result.stage = "gate"
    limit = entry.gates.get("max_ppl_increase")
    if limit is not None and not result.ppl_increase <= limit:
        raise QconvError(f"perplexity increase {result.ppl_increase:.2%} > max_ppl_increase {limit:.2%}")

    result.stage = "push"
    pushed = push(
        result.artifact_id,
        entry.repo,
        registry=registry,
        revision=plan.revision,
        private=plan.private,
        metrics=rows,
        base_model=plan.base_model,
    )
    result.stage = None
    result.status = "released" if pushed.status == "committed" else "unchanged"
    result.commit_sha, result.url = pushed.commit_sha, pushed.url


def _find(registry, entry: Entry, made: dict, source_files: dict, revision: str):
    """(an artifact of this source and recipe already pushed to the entry's repo and revision,
    else None; a verified one still on disk to resume from, else None; the first source file whose
    sha256 ``source_files`` does not know and the match took on its size alone, else None), from
    the registry."""
    released = reusable = unknown = None
    for row in registry.list_artifacts(method=entry.method):
        record = registry.get_artifact(row["id"])
        recipe = record["recipe"] or {}
        if any(recipe.get(k) != v for k, v in made.items()) or list(recipe.get("skip") or []) != entry.skip:
            continue
        same, unsure = same_source(record["source_files"] or {}, source_files)
        if not same:
            continue
        pushes = [p for p in record["pushes"] if p["repo"] == entry.repo and p["revision"] == revision]
        if pushes and released is None:
            released = {**record, "push": pushes[-1]}
            unknown = unknown or unsure
        if record["verified"] and Path(record["path"]).is_dir() and reusable is None:
            reusable = record
            unknown = unknown or unsure
    return released, reusable, unknown


def same_source(recorded: dict[str, dict], files: dict[str, dict]) -> tuple[bool, str | None]:
    """Whether ``files`` may be the source ``recorded`` lists (same names, sizes and sha256), and
    the first file it matched by name and size only (its sha256 unknown here), else None."""
    if set(recorded) != set(files):
        return False, None
    unsure = None
    for name, entry in sorted(files.items()):
        if recorded[name].get("size") != entry.get("size"):
            return False, None
        if entry.get("sha256") is None:
            unsure = unsure or name
        elif recorded[name].get("sha256") != entry["sha256"]:
            return False, None
    return True, unsure


def dry_run_source_files(base: str) -> tuple[str, str | None, dict[str, dict]]:
    """(kind, revision, ``{file name: {"sha256", "size"}}``) of the source as a dry run knows it
    without reading its weights: see the module docstring. A sha256 is None where not known."""
    hub = parse_hub_ref(base) if not Path(base).expanduser().exists() else None
    if hub is not None:
        folder, files = snapshot_without_weights(*hub)
        index = [folder / INDEX] if (folder / INDEX).is_file() else []
        for path in [folder / "config.json", *index, *(folder / n for n in support_file_names(folder))]:
            files[path.name] = hash_file(path)
        return "hub", folder.name, dict(sorted(files.items()))
    with open_source(base) as source:
        files = {}
        for path in source.hashed_files():
            if path.name.endswith(WEIGHT_SUFFIXES):
                files[path.name] = {"sha256": recall(path), "size": path.stat().st_size}
            else:  # config, index, tokenizer: small
                files[path.name] = hash_file(path)
        return source.kind, source.revision, dict(sorted(files.items()))


class Evaluator:
    """``qconv eval``'s measurement (:mod:`qconv.evaluate`) of each artifact, and of the source on
    the same windows in the artifact's working dtype (once a dtype: the entries share it)."""

    def __init__(self, plan: ReleasePlan, source_ref: str):
        self.plan, self.source_ref = plan, source_ref
        self._source: dict[str, EvalResult] = {}

    def measure(self, folder: str, manifest: dict) -> tuple[EvalResult, EvalResult]:
        """(the artifact's ``qconv eval`` result, the source's in the artifact's working dtype)."""
        settings = {key: self.plan.eval[key] for key in ("text", "seqlen", "max_windows")}
        measured = evaluate(folder, device=self.plan.device, **settings)
        dtype = manifest["recipe"].get("dtype", "bfloat16")
        if dtype not in self._source:
            self._source[dtype] = evaluate_source(
                self.source_ref,
                tokenizer_from=folder,
                working_dtype=dtype,
                device=self.plan.device,
                **settings,
            )
        return measured, self._source[dtype]


def source_metrics(source: EvalResult) -> dict[str, float]:
    """The source's metrics under the names an artifact's row records them: ``ppl_source``..."""
    return {f"{name}_source": value for name, value in source.metrics.items()}
