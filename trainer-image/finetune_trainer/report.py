"""STAND-IN for the report part's module (issue 22): the integrator takes theirs. Same signatures:
``html_report(job, rows, summary) -> str`` and ``write_reports(out_dir, job, rows, summary)``."""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def html_report(job: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    body = "".join(
        f"<tr><td>{r['index']}</td><td>{html.escape(str(r['expected']))}</td>"
        f"<td>{html.escape(json.dumps(r['outputs'], ensure_ascii=False))}</td></tr>"
        for r in rows
    )
    return (
        f"<!doctype html><meta charset=utf-8><title>{html.escape(job)}</title>"
        f"<table><tr><th>#</th><th>expected</th><th>outputs</th></tr>{body}</table>"
    )


def write_reports(
    out_dir: Path, job: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> None:
    (out_dir / "report.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    (out_dir / "report.html").write_text(html_report(job, rows, summary), encoding="utf-8")
