"""The README.md model card written into every artifact folder, and the one pushed to the Hub.

Both begin with YAML front matter that huggingface_hub's ``ModelCard`` / ``metadata_load``
parse (tests/test_base_model.py round-trips them): ``base_model`` (the Hub model the artifact
is a quantized version of, when one is known: :func:`qconv.manifest.base_model_of`) with
``base_model_relation: quantized``, which is how the Hub links a quantization to its base.
"""

from __future__ import annotations

import json
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
    base = _base_model(manifest)
    front = ["---", *_base_model_front(manifest)]
    if source.get("license"):
        front.append(f"license: {_yaml_str(source['license'])}")
    if get_format(method).container == "gguf":
        # the Hub's GGUF convention: no transformers library, the gguf tag and the file type
        front += ["tags:", "- qconv", "- gguf", "- quantized", f"- {_yaml_str(str(recipe['type']))}"]
    else:
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
        return _gguf_loading(repo, manifest or {"recipe": {"type": "TYPE"}})
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


def _gguf_loading(repo: str, manifest: dict) -> list[str]:
    """llama.cpp and what is built on it, by the file type (the Hub's ``repo:TYPE`` shorthand)."""
    file_type = manifest["recipe"]["type"]
    names = sorted(n for n in manifest.get("files", {}) if n.endswith(".gguf"))
    first = names[0] if names else f"*{file_type}.gguf"
    verified = (manifest.get("verify") or {}).get("logits") or {}
    lines = [
        f"One GGUF file, `{first}`" + (f" (first of {len(names)} parts)" if len(names) > 1 else "") + ".",
    ]
    if verified.get("loader"):
        lines[0] += f" Verified with {verified['loader']}."
    return [
        *lines,
        "",
        "```bash",
        f"llama-cli -hf {repo}:{file_type} -p 'Hello'",
        f"ollama run hf.co/{repo}:{file_type}",
        "```",
        "",
        "```python",
        "from llama_cpp import Llama",
        "",
        f'llm = Llama.from_pretrained(repo_id="{repo}", filename="{first}")',
        'print(llm("Hello", max_tokens=32)["choices"][0]["text"])',
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
        protocol = m.get("protocol")
        if isinstance(protocol, dict):
            protocol = ", ".join(f"{k}: {_cell(v)}" for k, v in sorted(protocol.items()))
        rows.append(f"| {m['name']} | {m['value']:.4g} | {protocol or '-'} |")
    return rows


def _provenance(manifest: dict) -> list[str]:
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
        "Every file's sha256 (its LFS oid) and every layer's error are in `qconv.json`; "
        "`qconv verify` re-checks a downloaded copy.",
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
