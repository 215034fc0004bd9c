"""A self-contained HTML report: the per-group metric table and every figure the task wrote.

Figures are embedded as base64 PNG so the single file can be mailed or attached to an issue.
"""

from __future__ import annotations

import base64
import html
import os
import shutil
from collections.abc import Mapping
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` in ``target``'s place; the earlier ``target`` (if any) is
    moved aside first and removed last, so that ``target`` is never a half-written folder."""
    old = None
    if target.exists():
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def metric_columns(metrics: Mapping[str, Mapping[str, float]]) -> list[str]:
    return list(dict.fromkeys(k for values in metrics.values() for k in values))


def markdown_table(metrics: Mapping[str, Mapping[str, float]], digits: int = 4) -> str:
    """The per-group table as markdown (also used by benchmark scripts)."""
    cols = metric_columns(metrics)
    lines = ["| group | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for group, values in metrics.items():
        cells = [f"{values[c]:.{digits}f}" if c in values else "-" for c in cols]
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_html_report(out_dir: Path, title: str, metrics: Mapping[str, Mapping[str, float]]) -> Path:
    """``out_dir/report.html`` with the metric table and the PNG figures found in ``out_dir``."""
    cols = metric_columns(metrics)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    rows = []
    for group, values in metrics.items():
        cells = "".join(f"<td>{values[c]:.4f}</td>" if c in values else "<td>-</td>" for c in cols)
        rows.append(f"<tr><th>{html.escape(group)}</th>{cells}</tr>")
    figures = []
    for png in sorted(out_dir.glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        figures.append(
            f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(png.name)}">'
            f"<figcaption>{html.escape(png.stem)}</figcaption></figure>"
        )
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}figure{{display:inline-block;margin:1em}}
img{{image-rendering:pixelated;max-width:100%}}</style></head>
<body><h1>{html.escape(title)}</h1>
<table><tr><th>group</th>{head}</tr>{"".join(rows)}</table>
{"".join(figures)}
</body></html>
"""
    path = out_dir / "report.html"
    atomic_write_text(path, page)
    return path
