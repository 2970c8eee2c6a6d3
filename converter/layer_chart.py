"""The per-layer error chart, as inline SVG, and the per-layer table: each quantized layer's relative error against its
block's index, one series (colour) per module type (q, k, v, o, gate, up, down...).

A layer's place comes from its name alone, so any architecture charts: the first number among
its dotted parts is the block (``model.layers.3.self_attn.q_proj`` -> 3, ``transformer.h.3.attn.c_attn``
-> 3), its last part that is not a number is the module type, without transformers' ``_proj``
(``q_proj`` -> ``q``, ``experts.7.w1`` -> ``w1``). Layers that are in no numbered block
(``lm_head`` when quantized) are listed under the chart, not plotted. Each series is a line through
its largest error in each block (an MoE block has one point per expert) with every layer a dot
whose tooltip (an SVG ``<title>``, shown by browsers without any script) names it.
"""

from __future__ import annotations

import math
import re
from typing import Any

from qconv.html_page import Markup, esc, fmt_float, join, table, tag

# Tableau 10: distinct on screen and in print for up to ten module types.
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#e15759",
    "#76b7b2",
    "#59a14f",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
    "#9c755f",
    "#bab0ac",
)
WIDTH, HEIGHT = 900, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 140, 16, 46
MAX_X_LABELS = 24


def layer_position(name: str) -> tuple[int | None, str]:
    """(block index or None, module type) of a layer's name."""
    parts = name.split(".")
    index = next((int(p) for p in parts if p.isdigit()), None)
    kind = next((p for p in reversed(parts) if not p.isdigit()), name)
    return index, kind.removesuffix("_proj") or kind


# The order a transformer block computes its projections in (attention, then the MLP), for the
# legend and the table; module types not named here follow, by name.
BLOCK_ORDER = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down")


def natural_key(name: str) -> tuple:
    """Sorts ``layers.10`` after ``layers.9``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name) if p)


def model_order(layers: dict[str, dict]) -> list[str]:
    """The layers' names in the model's order: block by block; within a block q, k, v, o, gate,
    up, down (``BLOCK_ORDER``), then the rest by name."""

    def key(name: str) -> tuple:
        index, kind = layer_position(name)
        rank = BLOCK_ORDER.index(kind) if kind in BLOCK_ORDER else len(BLOCK_ORDER)
        return (index is None, index or 0, rank, natural_key(name))

    return sorted(layers, key=key)


def _nice_step(span: float, ticks: int = 5) -> float:
    raw = span / ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def layer_error_chart(layers: dict[str, dict], title: str = "relative error by layer") -> Markup:
    """The chart as an ``<svg>`` element (with a sentence under it for what is not plotted)."""
    points: dict[str, list[tuple[int, float, str]]] = {}
    unplotted: list[str] = []
    for name in model_order(layers):
        index, kind = layer_position(name)
        error = _finite(layers[name].get("rel_error"))
        if index is None or error is None:
            unplotted.append(name)
            continue
        points.setdefault(kind, []).append((index, error, name))
    if not points:
        return tag("p", "No per-layer errors to chart.", cls="muted")

    first = min(i for series in points.values() for i, _, _ in series)
    last = max(i for series in points.values() for i, _, _ in series)
    top = max(e for series in points.values() for _, e, _ in series)
    step = _nice_step(top) if top > 0 else 0.01
    y_max = step * math.ceil(top / step) if top > 0 else step * 5
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(index: int) -> float:
        return LEFT + (plot_w / 2 if last == first else (index - first) / (last - first) * plot_w)

    def y(error: float) -> float:
        return TOP + plot_h - error / y_max * plot_h

    parts: list[Markup] = [tag("title", title)]
    # axes, grid and labels
    ticks = round(y_max / step)
    for k in range(ticks + 1):
        value = k * step
        yy = y(value)
        parts.append(
            Markup(f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e3e6eb"/>')
        )
        parts.append(
            Markup(
                f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end" font-size="11" fill="#4a5468">'
                f"{esc(f'{value:.4g}')}</text>"
            )
        )
    every = max(1, math.ceil((last - first + 1) / MAX_X_LABELS))
    for index in range(first, last + 1, every):
        parts.append(
            Markup(
                f'<text x="{x(index):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle" font-size="11" '
                f'fill="#4a5468">{index}</text>'
            )
        )
    parts.append(
        Markup(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{TOP + plot_h}" y2="{TOP + plot_h}" stroke="#7a8396"/>'
            f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + plot_h}" stroke="#7a8396"/>'
            f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 8}" text-anchor="middle" font-size="12" '
            'fill="#1d2330">block (layer index)</text>'
            f'<text transform="translate(14 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle" '
            'font-size="12" fill="#1d2330">relative error</text>'
        )
    )
    # one series per module type: a line through each block's largest error, a dot per layer
    for n, (kind, series) in enumerate(points.items()):
        colour = PALETTE[n % len(PALETTE)]
        worst: dict[int, float] = {}
        for index, error, _ in series:
            worst[index] = max(error, worst.get(index, 0.0))
        line = " ".join(f"{x(i):.1f},{y(e):.1f}" for i, e in sorted(worst.items()))
        group = [
            Markup(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{line}"/>'),
            *(
                Markup(
                    f'<circle cx="{x(i):.1f}" cy="{y(e):.1f}" r="3" fill="{colour}">'
                    f"{tag('title', name + ': ' + fmt_float(e, '.4g'))}</circle>"
                )
                for i, e, name in series
            ),
        ]
        parts.append(tag("g", join(group), cls="series", data_kind=kind))
        legend_y = TOP + 6 + n * 18
        parts.append(
            Markup(
                f'<rect x="{WIDTH - RIGHT + 16}" y="{legend_y}" width="12" height="12" fill="{colour}"/>'
                f'<text x="{WIDTH - RIGHT + 34}" y="{legend_y + 10}" font-size="12" fill="#1d2330">'
                f"{esc(kind)} ({len(series)})</text>"
            )
        )
    svg = tag(
        "svg",
        join(parts),
        xmlns="http://www.w3.org/2000/svg",
        width=WIDTH,
        height=HEIGHT,
        viewBox=f"0 0 {WIDTH} {HEIGHT}",
        role="img",
        aria_label=title,
        font_family="system-ui, sans-serif",
    )
    if not unplotted:
        return svg
    note = tag(
        "p",
        f"Not plotted (in no numbered block, or no finite error): {', '.join(unplotted)}.",
        cls="muted",
    )
    return Markup(svg + note)


def layers_table(layers: dict[str, dict]) -> Markup:
    """Every layer in the model's order: its block, module type, shape and errors."""
    rows = []
    for name in model_order(layers):
        entry = layers[name]
        index, kind = layer_position(name)
        rows.append(
            (
                tag("span", name, cls="mono"),
                "-" if index is None else str(index),
                kind,
                "x".join(str(d) for d in entry.get("shape") or []) or "-",
                fmt_float(entry.get("rel_error")),
                fmt_float(entry.get("max_abs"), ".4g"),
                fmt_float(entry.get("snr_db"), ".1f"),
                entry.get("format"),
            )
        )
    headers = ("layer", "block", "module", "shape", "rel error", "max abs", "SNR dB", "format")
    return table(headers, rows, ("block", "rel error", "max abs", "SNR dB"))
