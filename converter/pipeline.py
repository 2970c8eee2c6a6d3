"""The conversion, as a straight line: read -> plan -> quantize -> write -> verify -> record.

Reading runs one tensor ahead in a thread, the writer writes in another, and the source files
are hashed in a third, so disk reads, GPU work and disk writes overlap. Layer errors are
computed while the source weight is still on the device (never by re-reading). Everything is
written into a temporary folder beside the destination and renamed into place at the end.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qconv import gguf_export
from qconv.artifact import Artifact
from qconv.environment import environment, peak_rss_bytes, resolve_device, resolve_dtype
from qconv.errors import DestinationExistsError, DiskSpaceError, QconvError, UsageError, literal
from qconv.files import FLOAT_DTYPES, dtype_name, fsync_path, parse_size
from qconv.formats import all_formats, blockwise, get_format
from qconv.formats.base import PrepareContext, Prepared, QuantFormat
from qconv.manifest import (
    MANIFEST_NAME,
    BaseModelEntry,
    Manifest,
    SourceEntry,
    finite,
    new_manifest,
    parse_base_model,
    seal,
    write_manifest,
)
from qconv.model_card import model_card
from qconv.plan import Plan, make_plan
from qconv.progress import NO_PROGRESS, ProgressSink
from qconv.sources import Source, open_source
from qconv.sources.hqq import imported_method
from qconv.verify import (
    VerifyReport,
    check_layers,
    check_loader,
    check_max_rel_error,
    layer_error,
    verify_artifact,
)
from qconv.writer import PlannedTensor, SafetensorsShardWriter

# Above this many parameters the end-of-conversion logits check (which loads the source in
# float32 and the artifact) is skipped unless asked for; `qconv verify` can run it later.
LOGITS_CHECK_AUTO_MAX_PARAMS = 2_000_000_000
READ_AHEAD = 4  # tensors read ahead of the one being quantized
#: the largest output file unless --max-shard-size says otherwise, by container
DEFAULT_MAX_SHARD = {"safetensors": "5GB", "gguf": gguf_export.DEFAULT_MAX_SHARD}
WRITE_QUEUE = 8  # tensors waiting for the writer thread
# Free space asked for beyond the planned tensors' bytes: the estimate misses the shards' JSON
# headers and the few tensors sized only once quantized (bnb's quant_state), GGUF's metadata (a
# vocabulary of 100k+ tokens), config, tokenizer (Gemma's tokenizer.json is 33 MB), model card and
# manifest, and the file system's blocks and metadata; a disk filled to the last byte also leaves
# nothing for the registry's WAL. 2% of a large model covers the first kind; 32 MiB the small files.
DISK_MARGIN_PERCENT = 2
DISK_MARGIN_BYTES = 32 * 2**20


@dataclass
class ConvertResult:
    path: Path
    manifest: dict[str, Any]
    report: VerifyReport | None
    artifact_id: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def check_destination(dest: Path, source_ref: str, force: bool) -> None:
    if dest.exists() or dest.is_symlink():
        if not force:
            raise DestinationExistsError(f"{dest}: already exists (use --force to replace it)")
        if not dest.is_dir():
            raise DestinationExistsError(f"{dest}: exists and is not a folder; not replacing it")
        source_path = Path(source_ref).expanduser()
        if source_path.exists():
            src, dst = source_path.resolve(), dest.resolve()
            if src == dst or dst in src.parents:
                raise UsageError(f"{dest}: --force would delete the source itself")
        if dest.is_dir() and not (dest / MANIFEST_NAME).is_file() and any(dest.iterdir()):
            raise DestinationExistsError(f"{dest}: exists and is not a qconv artifact; not replacing it")


def free_bytes(folder: Path) -> int:
    """Bytes free to this user on the file system holding ``folder`` (an existing folder)."""
    return shutil.disk_usage(folder).free


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def check_free_space(dest: Path, artifact_bytes: int) -> None:
    """Refuse, before any quantization, when the file system that will hold ``dest`` has less
    free space than ``artifact_bytes`` and the margin. The temporary folder is beside ``dest``
    (the same file system), and a replaced artifact is removed only once the new one is in
    place, so it frees nothing before then. A calibrated run's checkpoint (written beside ``dest``
    too, as the calibration goes) is not counted."""
    folder = Path(os.path.abspath(dest)).parent
    while not folder.exists():  # created later; the space is its nearest existing parent's
        folder = folder.parent
    needed = -(-artifact_bytes * (100 + DISK_MARGIN_PERCENT) // 100) + DISK_MARGIN_BYTES  # in integers: exact
    free = free_bytes(folder)
    if needed > free:
        raise DiskSpaceError(
            f"{folder}: not enough free disk space for {dest.name}: it needs about {_size(needed)} "
            f"({needed:,} bytes, the artifact and a margin), {_size(free)} ({free:,} bytes) are free"
        )


def _read_ahead(
    source: Source,
    plan: Plan,
    device: torch.device,
    out: queue.Queue,
    stop: threading.Event,
    progress: ProgressSink,
    working_dtype: torch.dtype,
) -> None:
    """Read tensors in disk order. Weights to quantize on a GPU are read into page-locked memory
    and copied on a stream of their own, so reading, copying and quantizing overlap; the main
    thread waits for each copy's event before it uses the tensor. A layer the source holds
    packed already arrives as its stored tensors (a dict by suffix)."""
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    try:
        for item in plan.tensors:
            if stop.is_set():
                return
            if item.action == "packed":
                out.put((item, source.packed(item.module, dtype_name(working_dtype)), None))
                progress.advance("read")
                continue
            to_gpu = copy_stream is not None and item.action == "quantize"
            tensor = source.read(item.name, pin_memory=to_gpu)
            copied = None
            if to_gpu:
                with torch.cuda.stream(copy_stream):
                    tensor = tensor.to(device, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(copy_stream)
            out.put((item, tensor, copied))
            progress.advance("read")
        out.put(None)
    except BaseException as exc:  # handed to the main thread
        out.put(exc)


def _planned_outputs(
    source: Source, plan: Plan, fmt: QuantFormat, recipe: dict, working_dtype: torch.dtype
) -> list[PlannedTensor]:
    """Every tensor the writer will receive, in order, with dtype and shape where known."""
    planned = []
    for item in plan.tensors:
        if item.action in ("quantize", "packed"):
            if item.action == "packed":
                specs = source.packed_specs(item.module, dtype_name(working_dtype))
            else:
                specs = fmt.output_specs(item.info.shape, recipe)
            for suffix, spec in specs.items():
                dtype, shape = spec if spec is not None else (None, None)
                planned.append(PlannedTensor(f"{item.module}.{suffix}", dtype, shape))
        else:
            dtype = working_dtype if item.info.dtype in FLOAT_DTYPES else item.info.dtype
            planned.append(PlannedTensor(item.name, dtype, tuple(item.info.shape)))
    return planned


def convert(
    source_ref: str,
    output: str | Path,
    method: str | None,
    options: dict[str, Any] | None = None,
    *,
    skip: tuple[str, ...] | list[str] = (),
    device: str = "auto",
    dtype: str = "auto",
    max_shard_size: str | int | None = None,
    force: bool = False,
    verify: bool = True,
    logits: bool | None = None,
    max_rel_error: float | None = None,
    resume: bool = False,
    progress: ProgressSink = NO_PROGRESS,
    base_model: str | None = None,
) -> ConvertResult:
    """Convert ``source_ref`` into a quantized artifact folder at ``output``.

    ``logits``: run the real-loader logits check (None = only for models up to
    LOGITS_CHECK_AUTO_MAX_PARAMS); recording the artifact is :meth:`qconv.Qconv.convert`'s job.
    ``resume``: continue an interrupted calibration stage from its checkpoint folder (kept beside
    ``output`` as ``.NAME.qconv-checkpoint`` until the artifact is in place).
    A folder already quantized with HQQ is imported instead (``method`` None or ``hqq``): its
    layers arrive packed from the source and are written as they are, with their own settings.
    ``base_model``: the Hub model (``ORG/NAME[@REVISION]``) the artifact is a quantized version
    of, for the manifest and the model card; None: what the source says (a Hub repo, a folder in
    the Hugging Face cache, GGUF metadata naming its Hub repo), else none.
    """
    started = time.perf_counter()
    given_base = parse_base_model(base_model) if base_model is not None else None
    imported = imported_method(source_ref)
    if imported is not None:
        check_import_options(str(source_ref), imported, method, options, skip, max_rel_error)
        fmt = get_format(imported)
        recipe: dict[str, Any] = {}  # the source's own, once it is open
    elif method is None:
        raise UsageError(
            f"{source_ref}: --method is required (choose from {', '.join(sorted(all_formats()))})"
        )
    else:
        fmt = get_format(method)
        recipe = fmt.make_recipe(dict(options or {}))
    dest = Path(output).expanduser()
    check_destination(dest, str(source_ref), force)
    if max_shard_size is None:
        max_shard_size = DEFAULT_MAX_SHARD[fmt.container]
    try:
        max_shard_bytes = parse_size(max_shard_size)
    except ValueError as exc:
        raise UsageError("{option}: " + literal(exc), option="max_shard_size") from None
    resolve_dtype(dtype)
    check_max_rel_error(max_rel_error)
    torch_device = resolve_device(device)

    with open_source(source_ref) as source:
        base = given_base or source.base_model()
        working_dtype = resolve_dtype(dtype, auto=source.default_dtype())
        if imported is not None:
            recipe = source.imported_recipe(dtype_name(working_dtype))
        else:
            recipe.update(
                {"dtype": dtype_name(working_dtype), "skip": list(skip), "label": fmt.label(recipe)}
            )
        plan = make_plan(source, fmt, recipe, list(skip))
        gguf_model = None
        if fmt.container == "gguf":  # refused here, before anything is written, if llama.cpp cannot take it
            with tempfile.TemporaryDirectory(prefix="qconv-gguf-") as scratch:
                gguf_model = gguf_export.describe_source(source, Path(scratch))
                gguf_plan = gguf_export.plan_tensors(source, gguf_model, recipe, list(skip))
            artifact_bytes = sum(math.prod(gguf_export.byte_shape(t.shape, t.ggml_type)) for t in gguf_plan)
        else:
            planned = _planned_outputs(source, plan, fmt, recipe, working_dtype)
            artifact_bytes = sum(p.nbytes for p in planned if p.dtype is not None)
        check_free_space(dest, artifact_bytes)  # before the calibration and quantization, not hours later
        dest.parent.mkdir(parents=True, exist_ok=True)
        checkpoint = dest.parent / f".{dest.name}.qconv-checkpoint"
        if checkpoint.exists() and not resume and force:
            shutil.rmtree(checkpoint)  # --force starts over
        if checkpoint.exists() and not resume:
            raise UsageError(
                f"{checkpoint}: an interrupted conversion left its checkpoint here; add --resume to "
                "continue it, or --force to start over"
            )
        context = PrepareContext(
            source,
            plan,
            recipe,
            torch_device,
            checkpoint,
            resume,
            progress,
            block_types=gguf_export.block_typed_layers(gguf_model, gguf_plan)
            if gguf_model is not None
            else None,
        )
        try:
            prepared = fmt.prepare(context)
        except QconvError:
            blockwise.discard_if_unstarted(checkpoint)
            raise
        except torch.OutOfMemoryError as exc:
            blockwise.discard_if_unstarted(checkpoint)
            raise UsageError(f"out of memory while calibrating ({str(exc).splitlines()[0]})") from None
        prepare_s = time.perf_counter() - started
        tmp = dest.parent / f".{dest.name}.qconv-tmp-{os.getpid()}"
        try:  # made inside the try: a Ctrl-C just after mkdir must remove it too (tests/test_signals.py)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            if gguf_model is not None:
                result = _convert_gguf_into(
                    source,
                    plan,
                    gguf_model,
                    gguf_plan,
                    fmt,
                    recipe,
                    tmp,
                    torch_device,
                    max_shard_bytes,
                    verify,
                    logits,
                    max_rel_error,
                    progress,
                    base=base,
                    prepared=prepared,
                )
            else:
                result = _convert_into(
                    source,
                    plan,
                    fmt,
                    recipe,
                    tmp,
                    torch_device,
                    working_dtype,
                    max_shard_bytes,
                    verify,
                    logits,
                    max_rel_error,
                    progress,
                    prepared,
                    base=base,
                )
            _move_into_place(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with stopped_leaves_unrecorded(dest):
            if prepared is not None:
                shutil.rmtree(checkpoint, ignore_errors=True)  # the artifact holds it all now
    result.path = dest
    result.stats["prepare_s"] = prepare_s
    result.stats["total_s"] = time.perf_counter() - started
    return result


def check_import_options(
    source_ref: str,
    imported: str,
    method: str | None,
    options: dict[str, Any] | None,
    skip,
    max_rel_error: float | None,
) -> None:
    """An import takes no quantization options: the layers keep what they were made with."""
    if method is not None:
        get_format(method)  # an unknown name fails with the list of valid ones
        if method != imported:
            raise UsageError(
                f"{source_ref}: already quantized with {imported.upper()}; qconv imports it as it is (omit "
                f"--method or use --method {imported}) and does not re-quantize it with --method {method}"
            )
    given = sorted(k for k, v in (options or {}).items() if v is not None)
    flags = ["--" + k.replace("_", "-") for k in given]
    if skip:
        flags.append("--skip")
    if max_rel_error is not None:
        flags.append("--max-rel-error")
    if flags:
        raise UsageError(
            f"{', '.join(flags)} does not apply to an import: {source_ref} is already quantized with "
            f"{imported.upper()} and its layers keep their own settings"
        )


@contextmanager
def stopped_leaves_unrecorded(folder: Path) -> Iterator[None]:
    """For the steps after a complete artifact is in place at ``folder`` and before it is recorded:
    a signal (KeyboardInterrupt, or qconv's Terminated) then leaves it there unrecorded, which the
    exception carries (``qconv_unrecorded``) for the CLI to say, instead of "temporary files
    removed" (tests/test_signals.py)."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if getattr(exc, "qconv_unrecorded", None) is None:
            exc.qconv_unrecorded = Path(folder)
        raise


def _move_into_place(tmp: Path, dest: Path) -> None:
    for path in tmp.iterdir():  # the shards are flushed already; the small files are flushed here
        if not path.name.endswith(".safetensors"):
            fsync_path(path)
    fsync_path(tmp)
    if dest.exists():
        old = dest.parent / f".{dest.name}.qconv-old-{os.getpid()}"
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    fsync_path(dest.parent)


def _convert_into(
    source: Source,
    plan: Plan,
    fmt: QuantFormat,
    recipe: dict,
    tmp: Path,
    device: torch.device,
    working_dtype: torch.dtype,
    max_shard_bytes: int,
    verify: bool,
    logits: bool | None,
    max_rel_error: float | None,
    progress: ProgressSink,
    prepared: Prepared | None = None,
    base: BaseModelEntry | None = None,
) -> ConvertResult:
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.init()  # resetting the peak statistics needs an initialised context
        torch.cuda.reset_peak_memory_stats(device)
    source.start_hashing()  # alongside the reading (from the same bytes, where the reader can)
    planned = _planned_outputs(source, plan, fmt, recipe, working_dtype)
    known_bytes = sum(p.nbytes for p in planned if p.dtype is not None)
    progress.start("read", len(plan.tensors))
    progress.start("quantize", len(plan.quantized))
    progress.start("write", known_bytes, "bytes")
    writer = SafetensorsShardWriter(
        tmp, planned, max_shard_bytes, WRITE_QUEUE, on_written=lambda n: progress.advance("write", n)
    )
    tensors: queue.Queue = queue.Queue(maxsize=READ_AHEAD)
    stop = threading.Event()
    reader = threading.Thread(
        target=_read_ahead,
        args=(source, plan, device, tensors, stop, progress, working_dtype),
        daemon=True,
    )
    reader.start()

    layers: dict[str, dict] = {}
    timers: dict[str, float] = defaultdict(float)  # where the main thread's time went
    packed_bytes = 0
    quantized_params = 0
    total_params = 0
    try:
        while True:
            clock = time.perf_counter()
            item = tensors.get()
            timers["wait_read_s"] += time.perf_counter() - clock
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            entry, tensor, copied = item
            if copied is not None:
                torch.cuda.current_stream(device).wait_event(copied)
                tensor.record_stream(torch.cuda.current_stream(device))  # allocated on the copy stream
            if entry.action == "packed":  # stored as the source holds it: no float weight to compare
                clock = time.perf_counter()
                shape = plan.packed[entry.module].shape
                layers[entry.module] = {
                    "rel_error": None,
                    "max_abs": None,
                    "snr_db": None,
                    "shape": list(shape),
                    "format": plan.packed[entry.module].label,
                }
                quantized_params += shape[0] * shape[1]
                total_params += shape[0] * shape[1]
                outputs = {f"{entry.module}.{suffix}": value for suffix, value in tensor.items()}
                packed_bytes += sum(v.numel() * v.element_size() for v in outputs.values())
                timers["quantize_s"] += time.perf_counter() - clock
                progress.advance("quantize")
            elif entry.action == "copy":
                total_params += tensor.numel()
                replaced = prepared.replacement(entry.name) if prepared is not None else None
                if replaced is not None:
                    tensor = replaced
                if tensor.dtype in FLOAT_DTYPES:
                    tensor = tensor.to(working_dtype)
                outputs = {entry.name: tensor}
            else:
                total_params += tensor.numel()
                clock = time.perf_counter()
                weight = tensor.to(device=device, dtype=working_dtype)
                packed = prepared.packed(entry.module) if prepared is not None else None
                try:
                    if packed is None:
                        packed = fmt.quantize(weight, recipe, device)
                except QconvError as exc:
                    raise exc.with_context(entry.name) from None
                packed = {k: v.to(device) for k, v in packed.items()}
                error = layer_error(weight, fmt.dequantize(packed, recipe))
                extra = prepared.layer_stats(entry.module) if prepared is not None else {}
                layers[entry.module] = {
                    **error,
                    **extra,
                    "shape": list(weight.shape),
                    "format": recipe["label"],
                }
                quantized_params += weight.numel()
                outputs = {f"{entry.module}.{suffix}": value for suffix, value in packed.items()}
                packed_bytes += sum(v.numel() * v.element_size() for v in outputs.values())
                del weight, packed
                timers["quantize_s"] += time.perf_counter() - clock
                progress.advance("quantize")
            clock = time.perf_counter()
            for key, value in outputs.items():
                writer.add(key, value)
            timers["wait_write_s"] += time.perf_counter() - clock
            del outputs, tensor
        clock = time.perf_counter()
        files = writer.close()
        timers["finish_write_s"] += time.perf_counter() - clock
    except BaseException:
        stop.set()
        _drain(tensors)
        writer.abort()
        raise
    finally:
        for stage in ("read", "quantize", "write"):
            progress.finish(stage)
    reader.join()
    convert_s = time.perf_counter() - t0
    source_file_hashes = source.file_hashes()
    source_hash_wait_s = time.perf_counter() - t0 - convert_s

    quantization_config = fmt.quantization_config(recipe, plan)
    support = write_config_and_support(tmp, source, quantization_config, working_dtype)
    measured = [kv for kv in layers.items() if kv[1]["rel_error"] is not None]
    worst = max(measured, key=lambda kv: kv[1]["rel_error"]) if measured else (None, {"rel_error": None})
    manifest = new_manifest(
        source_entry(source, plan.architecture, source_file_hashes),
        recipe,
        prepared.calibration if prepared is not None else None,
        environment(device, fmt.libraries),
        layers,
        plan.skipped,
        {
            "quantized_params": quantized_params,
            "total_params": total_params,
            "quantized_layers": len(layers),
            "bits_per_weight": 8 * packed_bytes / quantized_params,
            "worst_layer": worst[0],
            "worst_rel_error": worst[1]["rel_error"],
        },
        base,
    )
    seal_artifact(tmp, manifest, files, ["config.json", *support])

    report = None
    t1 = time.perf_counter()
    run_logits = logits if logits is not None else total_params <= LOGITS_CHECK_AUTO_MAX_PARAMS
    if verify:
        if run_logits:
            progress.start("verify", None, "models")
        if plan.packed:
            # no float source: what `qconv verify` checks without one (files, decoding, a run)
            report = verify_artifact(tmp, None, device, logits=run_logits)
        else:
            report = VerifyReport(path=str(tmp))
            check_layers(layers, max_rel_error, report)
            if run_logits:
                artifact = Artifact(tmp)
                check_loader(artifact, source, device, report)
                artifact.close()
        if run_logits:
            progress.finish("verify")
        manifest["verify"] = report.manifest_entry()
        write_manifest(tmp, manifest)
    stats = {
        "convert_s": convert_s,
        **{k: round(v, 3) for k, v in timers.items()},
        "source_hash_wait_s": source_hash_wait_s,
        "verify_s": time.perf_counter() - t1,
        "bytes_written": writer.bytes_written,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    return ConvertResult(path=tmp, manifest=finite(manifest), report=report, stats=stats)


def _convert_gguf_into(
    source: Source,
    plan: Plan,
    model: gguf_export.GGUFModel,
    planned: list[gguf_export.PlannedTensor],
    fmt: QuantFormat,
    recipe: dict,
    tmp: Path,
    device: torch.device,
    max_shard_bytes: int,
    verify: bool,
    logits: bool | None,
    max_rel_error: float | None,
    progress: ProgressSink,
    base: BaseModelEntry | None = None,
    prepared: Prepared | None = None,
) -> ConvertResult:
    """The GGUF path (``fmt.container == "gguf"``): one llama.cpp file instead of safetensors
    shards and config.json; the manifest, model card and verification as for every method."""
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    source.start_hashing()
    path = tmp / f"{gguf_export.file_stem(source)}-{recipe['type']}.gguf"
    written = gguf_export.write_gguf(
        source, model, planned, fmt, recipe, path, device, max_shard_bytes, progress, prepared
    )
    convert_s = time.perf_counter() - t0
    source_file_hashes = source.file_hashes()
    layers = written.layers
    measured = [kv for kv in layers.items() if kv[1]["rel_error"] is not None]
    worst = max(measured, key=lambda kv: kv[1]["rel_error"]) if measured else (None, {"rel_error": None})
    recipe["gguf_architecture"] = model.arch
    manifest = new_manifest(
        source_entry(source, plan.architecture, source_file_hashes),
        recipe,
        prepared.calibration if prepared is not None else None,
        environment(device, fmt.libraries),
        layers,
        written.skipped,
        {
            "quantized_params": written.quantized_params,
            "total_params": written.total_params,
            "quantized_layers": len(layers),
            "bits_per_weight": 8 * written.quantized_bytes / max(written.quantized_params, 1),
            "worst_layer": worst[0],
            "worst_rel_error": worst[1]["rel_error"],
            "tensor_types": dict(sorted(Counter(t.ggml_type for t in planned).items())),
        },
        base,
    )
    manifest["files"] = dict(written.files)  # the model card names the .gguf file
    seal_artifact(tmp, manifest, dict(written.files), [])
    report = None
    t1 = time.perf_counter()
    run_logits = logits if logits is not None else written.total_params <= LOGITS_CHECK_AUTO_MAX_PARAMS
    if verify:
        report = VerifyReport(path=str(tmp))
        check_layers(layers, max_rel_error, report)
        if run_logits:
            progress.start("verify", None, "models")
            artifact = Artifact(tmp)
            check_loader(artifact, source, device, report)
            artifact.close()
            progress.finish("verify")
        manifest["verify"] = report.manifest_entry()
        write_manifest(tmp, manifest)
    stats = {
        "convert_s": convert_s,
        **{k: round(v, 3) for k, v in written.timers.items()},
        "verify_s": time.perf_counter() - t1,
        "bytes_written": sum(f["size"] for f in written.files.values()),
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
    }
    return ConvertResult(path=tmp, manifest=finite(manifest), report=report, stats=stats)


def write_config_and_support(
    folder: Path, source: Source, quantization_config: dict, working_dtype: torch.dtype
) -> list[str]:
    """``config.json`` (the source's, with the method's quantization_config and the working dtype)
    and the source's tokenizer and generation files; returns the support files' names."""
    config = source.config_dict()
    config["quantization_config"] = quantization_config
    config["dtype"] = dtype_name(working_dtype)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name(working_dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return source.write_support_files(folder)


def source_entry(source: Source, architecture: str | None, files: dict) -> SourceEntry:
    """The manifest's ``source``: what was read, at which revision, under which licence."""
    return {
        "kind": source.kind,
        "ref": source.ref,
        "revision": source.revision,
        "license": source.license,
        "architecture": architecture,
        "files": files,
    }


def seal_artifact(folder: Path, manifest: Manifest, files: dict, support: list[str]) -> None:
    """Write the model card, then list every file with its sha256 (the shards' ``files`` are
    hashed already, while written) and write the manifest. ``support``: the small files beside
    the weights (config.json, the tokenizer's), hashed here."""
    (folder / "README.md").write_text(model_card(manifest))
    seal(folder, manifest, files, ["README.md", *support])


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
