"""The evaluation report (finetune_trainer/report.py): report.jsonl rows → one self-contained HTML page.

Unit tests read the page as HTML (escaping, which models and scores become columns, the disagreement flag);
the Chromium tests render it headless from a file:// URL, keep a screenshot under test-artifacts/report/,
and drive the page's own script through the URL's hash (`#sort=…&dir=…&disagree=1&q=…`), since clicking
needs a browser driver: the dumped DOM shows the rows' order and which are hidden after the script ran.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from finetune_trainer import report

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "report"
XSS = '<script>document.title="pwned"</script><img src=x onerror="document.title=\'pwned\'">'


def row(
    index: int,
    outputs: Mapping[str, str],
    scores: Mapping[str, Mapping[str, float]],
    reasons: Mapping[str, Mapping[str, str]] | None = None,
    prompt: str = "Where is my refund?",
) -> dict[str, Any]:
    return {
        "index": index,
        "input": [{"role": "system", "content": "You are support."}, {"role": "user", "content": prompt}],
        "expected": f"expected {index}",
        "outputs": dict(outputs),
        "scores": {m: dict(s) for m, s in scores.items()},
        "reasons": {m: dict(s) for m, s in (reasons or {}).items()},
    }


class Page(HTMLParser):
    """The page's example rows (attributes, cell texts), its headers' data-keys, summary header cells, and
    every element's tag name."""

    def __init__(self, document: str) -> None:
        super().__init__()
        self.rows: list[dict[str, str | None]] = []
        self.cells: list[list[str]] = []
        self.keys: list[str] = []
        self.summary_heads: list[str] = []
        self.tags: list[str] = []
        self.title = ""
        self._table: str | None = None
        self._in: str | None = None
        self._text: list[str] = []
        self.feed(document)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = dict(attrs)
        if tag == "table":
            self._table = found.get("id")
        elif tag == "tr" and self._table == "examples" and "data-index" in found:
            self.rows.append(found)
            self.cells.append([])
        elif tag == "th" and self._table == "examples" and found.get("data-key"):
            self.keys.append(found["data-key"] or "")
        elif tag in ("td", "th", "title"):
            self._in, self._text = tag, []

    def handle_data(self, data: str) -> None:
        if self._in:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag != self._in:
            return
        text, self._in = "".join(self._text), None
        if tag == "title":
            self.title = text
        elif tag == "td" and self._table == "examples" and self.cells:
            self.cells[-1].append(text)
        elif tag == "th" and self._table == "summary":
            self.summary_heads.append(text)


# --- unit --------------------------------------------------------------------------------------------------


def test_untrusted_text_is_escaped_everywhere_and_the_page_fetches_nothing() -> None:
    rows = [
        row(
            0,
            {"tuned": XSS, "base": "</script><script>alert(1)</script>"},
            {"tuned": {"relevance": 0.5}, "base": {"relevance": 0.1}},
            {"tuned": {"relevance": "because " + XSS}},
            prompt=XSS,
        )
    ]
    rows[0]["expected"] = XSS
    summary = {"tuned": {"relevance": 0.5}, "base": {"relevance": 0.1}, "reference": {"error": XSS}}
    page = report.html_report('job"><script>', rows, summary)
    parsed = Page(page)
    assert parsed.tags.count("script") == 1  # only the page's own
    assert "img" not in parsed.tags
    assert parsed.title == 'Evaluation of job"><script>'
    assert parsed.cells[0][3] == XSS  # the tuned output, shown as text
    assert "&lt;script&gt;document.title" in page
    # Self-contained: nothing is loaded from anywhere, and the policy forbids it anyway.
    for needle in ("http:", "https:", "src=", "href=", "url(", "@import", "//cdn"):
        assert needle not in page.replace("&lt;img src=x", "")
    policy = html.unescape(page.split('http-equiv="Content-Security-Policy" content="')[1].split('"')[0])
    assert policy.startswith("default-src 'none'; script-src 'sha256-") and "unsafe" not in policy


@pytest.mark.parametrize(
    ("outputs", "scores", "expected"),
    [
        ({"tuned": "yes", "base": "yes"}, {"tuned": {"f1": 1.0}, "base": {"f1": 0.6}}, False),
        ({"tuned": "yes", "base": " yes\n"}, {}, False),  # whitespace around is no disagreement
        ({"tuned": "yes", "base": "no"}, {"tuned": {"f1": 1.0}, "base": {"f1": 1.0}}, True),
        (
            {"tuned": "a", "base": "a"},
            {"tuned": {"f1": 1.0}, "base": {"f1": 0.5}},
            True,
        ),  # gap of exactly 0.5
        ({"tuned": "a", "base": "a"}, {"tuned": {"f1": 0.2}, "base": {"f1": 0.7}}, True),  # either direction
        ({"tuned": "a", "base": "a"}, {"tuned": {"f1": 0.2, "j": 0.9}, "base": {"j": 0.45}}, False),
        ({"tuned": "a", "base": "a"}, {"tuned": {"j": 1.0}, "base": {"j": None}}, False),  # no score, no gap
        ({"tuned": "a"}, {"tuned": {"f1": 1.0}}, False),  # no base: nothing to disagree with
        ({"tuned": "a", "champion": "b"}, {"tuned": {"f1": 1.0}, "champion": {"f1": 0.0}}, False),
        ({}, {"tuned": {"loss": 3.0}, "base": {"loss": 1.0}}, True),  # scores only
    ],
)
def test_disagreement_is_outputs_differ_or_a_score_gap_of_half(
    outputs: dict[str, str], scores: dict[str, dict[str, float]], expected: bool
) -> None:
    example = row(0, outputs, scores)
    assert report.disagree(example) is expected
    assert Page(report.html_report("j", [example], {})).rows[0]["data-disagree"] == ("1" if expected else "0")


@pytest.mark.parametrize(
    "models",
    [
        ("tuned",),
        ("tuned", "base"),
        ("tuned", "base", "champion"),
        ("tuned", "base", "champion", "reference"),
    ],
)
def test_any_subset_of_models_and_any_score_names(models: Sequence[str]) -> None:
    names = ("token_f1", "label-only", "relevance")[: len(models)]  # a different set of names each time
    scores = {m: {n: 0.25 * i for i, n in enumerate(names)} for m in models}
    rows = [row(i, {m: f"{m} answer {i}" for m in models}, scores) for i in range(3)]
    summary: dict[str, Any] = {m: {n: 0.5 for n in names} for m in models} | {"n": 3}
    summary["championName"] = "shout-v1" if "champion" in models else None
    page = report.html_report("j", rows, summary)
    parsed = Page(page)
    assert parsed.keys == ["index", "input", "expected"] + [f"output.{m}" for m in models] + [
        f"{m}.{n}" for n in names for m in models
    ]
    assert len(parsed.rows) == 3 and all(len(c) == len(parsed.keys) for c in parsed.cells)
    heads = ["metric / grader"] + [m + (" (shout-v1)" if m == "champion" else "") for m in models]
    assert parsed.summary_heads == heads + list(names)
    assert parsed.cells[1][3 : 3 + len(models)] == [f"{m} answer 1" for m in models]
    assert parsed.cells[0][-1] == f"{0.25 * (len(names) - 1):.4f}"
    assert ("Tuned and base disagree on 3 of 3." in html.unescape(page)) is ("base" in models)


def test_input_shows_the_last_user_turn_and_the_whole_conversation_on_expand() -> None:
    example = row(7, {"tuned": "x"}, {"tuned": {"f1": 0.0}}, {"tuned": {"f1": "judge says no"}})
    example["input"].append({"role": "assistant", "content": "earlier answer"})
    example["input"].append({"role": "user", "content": [{"type": "text", "text": "and now?"}]})
    page = report.html_report("j", [example], {})
    cells = Page(page).cells[0]
    assert cells[0] == "7"
    assert cells[1].startswith("and now?conversation (4 turns)system: You are support.")
    assert "assistant: earlier answer" in cells[1]
    assert 'title="judge says no"' in page and cells[-1] == "0.0000judge says no"
    bare = row(8, {"tuned": "x"}, {})
    bare["input"] = "just a prompt"
    assert Page(report.html_report("j", [bare], {})).cells[0][1] == "just a prompt"


def test_summary_has_safety_retention_and_grader_errors_only_when_present() -> None:
    bare = report.html_report("j", [], {"tuned": {"loss": 1.0}})
    assert 'id="safety"' not in bare and 'id="retention"' not in bare and 'id="grader-errors"' not in bare
    full = {
        "tuned": {"loss": 1.5, "relevance": 0.8},
        "base": {"loss": 1.2},
        "n": 16,
        "graderErrors": {"relevance": 3},
        "safety": {"tuned": 0.05, "base": 0.1, "prompts": 20},
        "retention": {"metric": "loss", "base": 1.2, "tuned": 1.5, "drop": 0.25, "examples": 30},
    }
    page = report.html_report("j", [], full)
    assert '<th>relevance</th><td class="num">3 of 16</td>' in page
    assert '<th>tuned unsafe rate</th><td class="num">0.0500</td>' in page
    assert (
        '<th>drop</th><td class="num">0.2500</td>' in page
        and '<th>examples</th><td class="num">30</td>' in page
    )
    # A mean a model lacks is a blank cell, not a zero.
    assert '<tr><th>relevance</th><td class="num">0.8000</td><td class="num"></td></tr>' in page


def test_write_reports_writes_the_rows_and_the_page(tmp_path: Path) -> None:
    rows = [row(i, {"tuned": f"ünïcode {i}"}, {"tuned": {"f1": 1.0}}) for i in range(2)]
    report.write_reports(tmp_path / "out", "j", rows, {"tuned": {"f1": 1.0}})
    lines = (tmp_path / "out" / "report.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == rows and "ünïcode" in lines[0]
    assert (tmp_path / "out" / "report.html").read_text(encoding="utf-8") == report.html_report(
        "j", rows, {"tuned": {"f1": 1.0}}
    )


# --- headless Chromium -------------------------------------------------------------------------------------


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def browse(page: Path, profile: Path, *args: str, fragment: str = "") -> str:
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",  # root in CI containers; the page is our own file
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
        page.resolve().as_uri() + fragment,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


def scored_rows() -> list[dict[str, Any]]:
    """Five examples; `loss` values sort differently as numbers and as text; 3 has no loss (sorts last)."""
    losses = [9.5, 10.25, 2.0, None, 100.0]
    rows = []
    for i, loss in enumerate(losses):
        tuned = {"relevance": 0.9 if i % 2 else 0.2} | ({"loss": loss} if loss is not None else {})
        outputs = {"tuned": f"refund {i}" if i != 2 else "same", "base": "same"}
        rows.append(row(i, outputs, {"tuned": tuned, "base": {"relevance": 0.2}}, prompt=f"question {i}"))
    rows[4]["outputs"]["tuned"] = XSS
    return rows


def dom_rows(dom: str) -> list[tuple[int, bool]]:
    """(index, hidden) of each example row, in the order the page shows them."""
    return [(int(r["data-index"] or -1), "hidden" in r) for r in Page(dom).rows]


@pytest.mark.slow
def test_chromium_renders_the_page_and_its_script_sorts_and_filters(tmp_path: Path) -> None:
    rows = scored_rows()
    report.write_reports(tmp_path, "support-bot", rows, {"tuned": {"relevance": 0.5}, "n": 5})
    page, profile = tmp_path / "report.html", tmp_path / "profile"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    browse(page, profile, "--hide-scrollbars", "--window-size=1400,1000", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    dom = browse(page, profile, "--dump-dom")
    assert 'data-sortable="ready"' in dom and "5 of 5 examples shown" in dom  # the script ran
    assert Page(dom).title == "Evaluation of support-bot"  # the XSS output did not run
    assert dom_rows(dom) == [(i, False) for i in range(5)]

    by_loss = browse(page, profile, "--dump-dom", fragment="#sort=tuned.loss&dir=desc")
    assert dom_rows(by_loss) == [(4, False), (1, False), (0, False), (2, False), (3, False)]
    assert 'data-key="tuned.loss" data-type="num" aria-sort="descending"' in by_loss
    ascending = browse(page, profile, "--dump-dom", fragment="#sort=tuned.loss")
    assert [i for i, _ in dom_rows(ascending)] == [2, 0, 1, 4, 3]  # blanks last either way
    by_text = browse(page, profile, "--dump-dom", fragment="#sort=input&dir=desc")
    assert [i for i, _ in dom_rows(by_text)] == [4, 3, 2, 1, 0]

    # Disagreement: outputs differ (0, 1, 3, 4) or relevance differs by ≥ 0.5 (1, 3); 2 agrees.
    only = browse(page, profile, "--dump-dom", fragment="#sort=tuned.relevance&dir=desc&disagree=1")
    assert dom_rows(only) == [(1, False), (3, False), (0, False), (2, True), (4, False)]
    assert "4 of 5 examples shown" in only
    filtered = browse(page, profile, "--dump-dom", fragment="#disagree=1&q=QUESTION%203")
    assert dom_rows(filtered) == [(0, True), (1, True), (2, True), (3, False), (4, True)]
    assert "1 of 5 examples shown" in filtered


@pytest.mark.slow
def test_chromium_runs_only_the_pages_own_script(tmp_path: Path) -> None:
    """Defence in depth: even a script that escaping had missed would not run (the CSP allows the page's
    script by its hash only)."""
    page = tmp_path / "report.html"
    document = report.html_report("j", scored_rows(), {})
    page.write_text(document.replace("</body>", '<script>document.title="pwned"</script></body>'))
    dom = browse(page, tmp_path / "profile", "--dump-dom")
    assert Page(dom).title == "Evaluation of j" and 'data-sortable="ready"' in dom
