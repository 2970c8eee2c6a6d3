"""The README.md model card written into every artifact folder."""

from __future__ import annotations

from pathlib import Path


def model_card(manifest: dict) -> str:
    recipe = manifest["recipe"]
    summary = manifest["summary"]
    source = manifest["source"]
    base = source["ref"] if source["kind"] == "hub" else Path(source["ref"]).name
    options = ", ".join(f"`{k}={v}`" for k, v in recipe.items() if k not in ("label",))
    lines = [
        "---",
        "tags:",
        "- qconv",
        f"- {recipe['method']}",
        "base_model_relation: quantized",
        "---",
        "",
        f"# {base} ({recipe['label']})",
        "",
        (
            f"Imported by qconv {manifest['qconv']} from `{base}`, already quantized ({recipe['imported_from']}): "
            "re-serialized, not re-quantized."
            if recipe.get("imported_from")
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
        "",
        "Every file's sha256 and each layer's error are in `qconv.json`; `qconv verify` re-checks them.",
        "",
    ]
    return "\n".join(lines)
