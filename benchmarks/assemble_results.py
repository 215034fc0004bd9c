"""Rebuild ``docs/results.md`` from its hand-written summary and the studies' generated tables.

``docs/results.md`` = its own text up to the first generated section, then
``docs/results_digits.md`` (``digits_study.py``), ``docs/results_cartoon.md`` and
``docs/results_cartoon_long.md`` (``cartoon_study.py``, the latter retitled as the investigation).

    .venv/bin/python benchmarks/assemble_results.py
"""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
PARTS = {
    "results_digits.md": None,
    "results_cartoon.md": None,
    "results_cartoon_long.md": "## Cartoon study, longer budget (investigation, seeds 0 and 1)",
}


def main() -> None:
    results = DOCS / "results.md"
    text = results.read_text()
    head = text.split("\n## Digits study", 1)[0].rstrip() + "\n"
    parts = [head]
    for name, title in PARTS.items():
        body = (DOCS / name).read_text().strip() + "\n"
        if title is not None:
            body = title + "\n" + body.split("\n", 1)[1]
        parts.append(body)
    results.write_text("\n".join(parts))
    print(f"wrote {results} ({len(parts) - 1} generated sections)")


if __name__ == "__main__":
    main()
