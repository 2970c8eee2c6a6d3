"""The README.md model card written into every artifact folder, and the one pushed to the Hub.

Both begin with YAML front matter that huggingface_hub's ``ModelCard`` / ``metadata_load``
parse (tests/test_base_model.py round-trips them): ``base_model`` (the Hub model the artifact
is a quantized version of, when one is known: :func:`qconv.manifest.base_model_of`) with
``base_model_relation: quantized``, which is how the Hub links a quantization to its base.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from qconv.formats import get_format
from qconv.manifest import base_model_of, imported_from


def model_card(manifest: dict) -> str:
    recipe = manifest["recipe"]
    summary = manifest["summary"]
    source = manifest["source"]
    base = source["ref"] if source["kind"] == "hub" else Path(source["ref"]).name
    options = ", ".join(f"`{k}={v}`" for k, v in recipe.items() if k not in ("label",))
    lines = [
        "---",
        *_base_model_front(manifest),
        "tags:",
        "- qconv",
        f"- {_yaml_str(str(recipe['method']))}",
        "---",
        "",
        f"# {base} ({recipe['label']})",
        "",
        (
            f"Imported by qconv {manifest['qconv']} from `{base}`, already quantized ({imported_from(manifest)}): "
            "re-serialized, not re-quantized."
            if imported_from(manifest)
            else f"Quantized with qconv {manifest['qconv']} from `{base}` ({source['kind']} source)."
        ),
        "",
        f"- Recipe: {options}",
        f"- Quantized layers: {summary['quantized_layers']} ({summary['quantized_params']:,} of "
        f"{summary['total_params']:,} parameters), {summary['bits_per_weight']:.3f} bits per quantized weight",
        (
            f"- Worst layer: `{summary['worst_layer']}`, relative error {summary['worst_rel_error']:.4f}"
            if summary["worst_rel_error"] is not None
            else "- Layer errors: unknown (no float source to measure them against)"
        ),
        f"- Left unquantized: {', '.join(f'`{m}`' for m in manifest['skipped']) or 'none'}",
        *(
            [
                f"- GGUF file: `{n}` (llama.cpp loads it)"
                for n in sorted(manifest["files"])
                if n.endswith(".gguf")
            ][:1]
            if manifest.get("files")
            else []
        ),
        "",
        "Every file's sha256 and each layer's error are in `qconv.json`; `qconv verify` re-checks them.",
        "",
    ]
    return "\n".join(lines)


def hub_model_card(manifest: dict, metrics: list[dict], repo: str) -> str:
    """The README.md pushed to the Hub: YAML front matter the Hub indexes (base model, relation,
    licence, tags), then the recipe, how to load it, the metrics with their protocol, and where
    it came from. Deterministic: the same artifact and metrics give the same bytes, so pushing
    again finds nothing changed."""
    recipe, source, summary = manifest["recipe"], manifest["source"], manifest["summary"]
    method = recipe["method"]
    if get_format(method).container == "gguf":
        return gguf_hub_card([(manifest, metrics)], repo)
    base = _base_model(manifest)
    front = ["---", *_base_model_front(manifest)]
    if source.get("license"):
        front.append(f"license: {_yaml_str(source['license'])}")
    front += ["library_name: transformers", "tags:", "- qconv", f"- {_yaml_str(method)}", "- quantized"]
    bits = recipe.get("bits")
    if bits:
        front.append(f"- {_yaml_str(f'{bits}-bit')}")
    front.append("---")

    title = f"# {repo.split('/')[-1]}"
    lines = [
        *front,
        "",
        title,
        "",
        f"`{base or source['ref']}` quantized with qconv {manifest['qconv']}: "
        f"{recipe.get('label') or method}, {summary['bits_per_weight']:.3f} bits per quantized weight, "
        f"{summary['quantized_layers']} layers quantized.",
        "",
        "## Recipe",
        "",
        "| option | value |",
        "|---|---|",
        *(f"| `{k}` | `{_cell(v)}` |" for k, v in recipe.items()),
        "",
        f"Left unquantized: {', '.join(f'`{m}`' for m in manifest.get('skipped') or []) or 'none'}.",
        (
            f"Worst layer: `{summary['worst_layer']}`, relative error {summary['worst_rel_error']:.4f}."
            if summary.get("worst_rel_error") is not None
            else "Layer errors: unknown (no float source to measure them against)."
        ),
        "",
        "## Use",
        "",
        *_loading(method, repo, manifest),
        "",
        "## Metrics",
        "",
        *_metrics(metrics),
        "",
        "## Provenance",
        "",
        *_provenance(manifest),
        "",
    ]
    return "\n".join(lines)


def gguf_hub_card(entries: list[tuple[dict, list[dict]]], repo: str) -> str:
    """The README.md of a GGUF repo holding one or several of qconv's GGUF artifacts (one file
    type each: ``NAME-Q4_K_M.gguf``, ``NAME-Q8_0.gguf``...), from their manifests and metrics:
    ``entries`` is ``[(manifest, metrics)]``, the artifact being pushed first (its base model
    and licence head the card; another entry's base model when it has none). The Hub's GGUF
    conventions: no transformers library, the ``gguf`` tag and one tag per file type, then one
    table of the files and usage snippets naming each. Deterministic: rows are ordered by file
    name, so the same entries give the same bytes (pushing again finds nothing changed)."""
    first = entries[0][0]
    rows = sorted(entries, key=lambda e: gguf_files(e[0])[:1] or [e[0]["recipe"]["type"]])
    front_of = next((m for m, _ in entries if base_model_of(m)), first)
    front = ["---", *_base_model_front(front_of)]
    if first["source"].get("license"):
        front.append(f"license: {_yaml_str(first['source']['license'])}")
    types = sorted({str(m["recipe"]["type"]) for m, _ in entries})
    front += ["tags:", "- qconv", "- gguf", "- quantized", *(f"- {_yaml_str(t)}" for t in types)]
    front.append("---")
    base = _base_model(front_of) or first["source"]["ref"]
    lines = [
        *front,
        "",
        f"# {repo.split('/')[-1]}",
        "",
        f"`{base}` quantized with qconv for llama.cpp and what is built on it (Ollama, LM Studio, "
        "llama-cpp-python), in the GGUF file types below:",
        "",
        "| file | type | bits per weight | size | worst layer error | perplexity | verified with |",
        "|---|---|---:|---:|---:|---:|---|",
        *(_gguf_row(manifest, metrics) for manifest, metrics in rows),
        "",
        "Bits per weight are those of the quantized layers (token embeddings and output included); "
        "the worst layer error is the relative error of the worst tensor against the source; "
        "perplexity is computed by the engine named under Metrics, with its protocol.",
        "",
        *_gguf_verified(rows),
        "",
        "## Use",
        "",
        *_gguf_loading(repo, rows),
        "",
        "## Recipes",
        "",
        *(_gguf_recipe(manifest) for manifest, _ in rows),
        "",
        "## Metrics",
        "",
        *_gguf_metrics(rows),
        "",
        "## Provenance",
    ]
    for manifest, _ in rows:
        lines += [
            "",
            f"### `{_gguf_first(manifest)}`",
            "",
            *_provenance(manifest, gguf_manifest_name(manifest)),
        ]
    lines.append("")
    return "\n".join(lines)


def gguf_files(manifest: dict) -> list[str]:
    """The artifact's GGUF files, sorted (the first part first, for a split file)."""
    return sorted(n for n in manifest.get("files") or {} if n.endswith(".gguf"))


#: gguf-split's part suffix (llama.cpp's ``llama_split_path``: ``PREFIX-%05d-of-%05d.gguf``)
_SPLIT_PART = re.compile(r"-\d{5}-of-\d{5}$")


def gguf_stem(manifest: dict) -> str:
    """``NAME-TYPE``: the artifact's GGUF file name without ``.gguf`` and without a split part's
    ``-00001-of-0000N``; for a manifest listing no GGUF file, ``TYPE``."""
    names = gguf_files(manifest)
    if not names:
        return str(manifest["recipe"]["type"])
    return _SPLIT_PART.sub("", names[0].removesuffix(".gguf"))


def gguf_manifest_name(manifest: dict) -> str:
    """Where a GGUF artifact's manifest goes in a Hub repo: ``NAME-TYPE.qconv.json`` beside its
    ``NAME-TYPE.gguf``, so that several file types coexist in one repo."""
    return f"{gguf_stem(manifest)}.qconv.json"


def _gguf_first(manifest: dict) -> str:
    names = gguf_files(manifest)
    return names[0] if names else f"*{manifest['recipe']['type']}.gguf"


def _gguf_loader(manifest: dict) -> str | None:
    return ((manifest.get("verify") or {}).get("logits") or {}).get("loader")


def _gguf_ppl(metrics: list[dict]) -> dict | None:
    """The perplexity the table shows: the last one recorded (all are under Metrics)."""
    rows = [m for m in metrics if m.get("name") == "ppl"]
    return rows[-1] if rows else None


def _gguf_row(manifest: dict, metrics: list[dict]) -> str:
    summary, files = manifest.get("summary") or {}, manifest.get("files") or {}
    names = gguf_files(manifest)
    size = sum(files[n].get("size") or 0 for n in names)
    parts = f" (+{len(names) - 1} parts)" if len(names) > 1 else ""
    error = summary.get("worst_rel_error")
    worst = f"{error:.4f} (`{summary.get('worst_layer')}`)" if error is not None else "unknown"
    ppl = _gguf_ppl(metrics)
    bits = summary.get("bits_per_weight")
    bits_cell = f"{bits:.3f}" if bits is not None else "-"
    ppl_cell = f"{ppl['value']:.4g}" if ppl else "-"
    return (
        f"| `{_gguf_first(manifest)}`{parts} | {manifest['recipe']['type']} | {bits_cell} | "
        f"{_size(size)} | {worst} | {ppl_cell} | {_gguf_loader(manifest) or 'not verified'} |"
    )


def _gguf_verified(rows: list[tuple[dict, list[dict]]]) -> list[str]:
    """Which llama.cpp version verified which file: one line per version."""
    by_loader: dict[str, list[str]] = {}
    for manifest, _ in rows:
        by_loader.setdefault(_gguf_loader(manifest) or "", []).append(f"`{_gguf_first(manifest)}`")
    return [
        f"Verified with {loader}: {', '.join(names)}." if loader else f"Not verified: {', '.join(names)}."
        for loader, names in sorted(by_loader.items())
    ]


def _gguf_loading(repo: str, rows: list[tuple[dict, list[dict]]]) -> list[str]:
    """llama.cpp and what is built on it, for each file type (the Hub's ``repo:TYPE`` shorthand
    picks the file of that type), and llama-cpp-python by file name."""
    commands, python = [], []
    for manifest, _ in rows:
        file_type = manifest["recipe"]["type"]
        commands += [f"llama-cli -hf {repo}:{file_type} -p 'Hello'", f"ollama run hf.co/{repo}:{file_type}"]
        line = f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{_gguf_first(manifest)}")'
        python.append(("# " if python else "") + line + f"  # {file_type}")
    split = [
        f"`{_gguf_first(m)}` is the first of {len(gguf_files(m))} parts; llama.cpp loads the others beside it."
        for m, _ in rows
        if len(gguf_files(m)) > 1
    ]
    if len(rows) == 1:
        names = gguf_files(rows[0][0])
        parts = (
            f" (first of {len(names)} parts; llama.cpp loads the others beside it)" if len(names) > 1 else ""
        )
        intro, split = f"One GGUF file, `{_gguf_first(rows[0][0])}`{parts}.", []
    else:
        intro = (
            "Pick a file by its type (`-hf REPO:TYPE`, `hf.co/REPO:TYPE`) or by its name (llama-cpp-python):"
        )
    return [
        intro,
        "",
        "```bash",
        *commands,
        "```",
        "",
        "```python",
        "from llama_cpp import Llama",
        "",
        *python,
        'print(llm("Hello", max_tokens=32)["choices"][0]["text"])',
        "```",
        *([""] + split if split else []),
    ]


def _gguf_recipe(manifest: dict) -> str:
    options = ", ".join(f"`{k}={_cell(v)}`" for k, v in manifest["recipe"].items() if k != "label")
    skipped = ", ".join(f"`{m}`" for m in manifest.get("skipped") or []) or "none"
    return f"- `{_gguf_first(manifest)}`: {options}; left unquantized: {skipped}."


def _gguf_metrics(rows: list[tuple[dict, list[dict]]]) -> list[str]:
    measured = [(manifest, m) for manifest, metrics in rows for m in metrics]
    if not measured:
        return ["Not measured yet (`qconv eval`)."]
    table = ["| file | metric | value | protocol |", "|---|---|---:|---|"]
    for manifest, m in measured:
        table.append(f"| `{_gguf_first(manifest)}` | {_metric_row(m)} |")
    return table


def _size(size: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.2f} {unit}"
    return f"{size} B"


def _base_model(manifest: dict) -> str | None:
    """The Hub id for ``base_model``, when the artifact has a base model."""
    entry = base_model_of(manifest)
    return entry["repo_id"] if entry else None


def _base_model_front(manifest: dict) -> list[str]:
    """``base_model`` and ``base_model_relation`` front matter lines, or none: the relation
    alone (no base model to relate to) tells the Hub nothing."""
    base = _base_model(manifest)
    return [f"base_model: {_yaml_str(base)}", "base_model_relation: quantized"] if base else []


def _loading(method: str, repo: str, manifest: dict | None = None) -> list[str]:
    """How to load it, as the method declares (``stock_loader``, ``libraries``, ``extra``)."""
    fmt = get_format(method)
    if fmt.stock_loader == "llama.cpp":
        return _gguf_loading(repo, [(manifest or {"recipe": {"type": "TYPE"}}, [])])
    if fmt.stock_loader == "transformers":
        return [
            f"Stock transformers loads it (install `{' '.join(fmt.libraries)}`):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo}", device_map="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
            "```",
            *_serving(fmt.serving_engines, repo),
        ]
    return [
        f"transformers 5.x cannot load {method} folders; `qconv.load_model` can "
        f"(`pip install qconv{f'[{fmt.extra}]' if fmt.extra else ''}`):",
        "",
        "```python",
        "import qconv",
        "from huggingface_hub import snapshot_download",
        "from transformers import AutoTokenizer",
        "",
        f'folder = snapshot_download("{repo}")',
        'model = qconv.load_model(folder, device="cuda")',
        "tokenizer = AutoTokenizer.from_pretrained(folder)",
        "```",
    ]


#: how each serving engine a method declares (``QuantFormat.serving_engines``) serves a Hub repo
_SERVE = {
    "vllm": ("vLLM", "vllm serve {repo}"),
    "sglang": ("SGLang", "python -m sglang.launch_server --model-path {repo}"),
}


def _serving(engines: tuple[str, ...], repo: str) -> list[str]:
    lines = []
    for engine in engines:
        name, command = _SERVE[engine]
        lines += ["", f"Serve with {name}:", "", "```bash", command.format(repo=repo), "```"]
    return lines


def _metrics(metrics: list[dict]) -> list[str]:
    if not metrics:
        return ["Not measured yet (`qconv eval`)."]
    rows = ["| metric | value | protocol |", "|---|---:|---|"]
    for m in sorted(metrics, key=lambda m: (m["name"], str(m.get("protocol")))):
        rows.append(f"| {_metric_row(m)} |")
    return rows


def _metric_row(m: dict) -> str:
    """``name | value | protocol`` cells of one metric."""
    protocol = m.get("protocol")
    if isinstance(protocol, dict):
        protocol = ", ".join(f"{k}: {_cell(v)}" for k, v in sorted(protocol.items()))
    return f"{m['name']} | {m['value']:.4g} | {protocol or '-'}"


def _provenance(manifest: dict, manifest_name: str = "qconv.json") -> list[str]:
    source, env = manifest["source"], manifest.get("environment") or {}
    base = base_model_of(manifest)
    lines = [
        f"- Source: {source['kind']} `{source['ref']}`"
        + (f" at commit `{source['revision']}`" if source.get("revision") else ""),
        *(
            [
                f"- Base model: `{base['repo_id']}`"
                + (f" at `{base['revision']}`" if base.get("revision") else "")
                + f" ({_BASE_ORIGIN.get(base.get('origin'), base.get('origin'))})"
            ]
            if base
            else []
        ),
        f"- Converted: {manifest.get('created')} by qconv {manifest['qconv']}",
        "- Environment: "
        + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None and k not in ("platform",)),
        "- Verification: "
        + (
            ("passed" if manifest["verify"]["passed"] else "FAILED")
            + "; "
            + "; ".join(f"{c['name']}: {c['detail']}" for c in manifest["verify"].get("checks", []))
            if manifest.get("verify")
            else "not run"
        ),
        "- Source files (sha256):",
        "",
        "| file | sha256 | size |",
        "|---|---|---:|",
        *(
            f"| `{n}` | `{e['sha256']}` | {e['size']} |"
            for n, e in sorted((source.get("files") or {}).items())
        ),
        "",
        f"Every file's sha256 (its LFS oid) and every layer's error are in `{manifest_name}`"
        + ("; `qconv verify` re-checks a downloaded copy." if manifest_name == "qconv.json" else "."),
    ]
    return lines


#: how the provenance says where a base model came from (qconv.manifest.BASE_MODEL_ORIGINS)
_BASE_ORIGIN = {
    "given": "given with --base-model",
    "hub": "the Hub source",
    "hub-cache": "the source's folder in the Hugging Face cache",
    "gguf": "the GGUF source's metadata",
}


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _yaml_str(value: str) -> str:
    """A YAML scalar that reads back as this very string: plain when it is made of ASCII letters,
    digits and ``-_./`` and PyYAML (which huggingface_hub reads cards with) reads it back as it
    is (not ``yes``, ``null``, ``0x1f``, ``1.5``...), else double-quoted with JSON's escapes,
    which YAML reads too."""
    if value and value.isascii() and all(c.isalnum() or c in "-_./" for c in value):
        try:
            if yaml.safe_load(value) == value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)
