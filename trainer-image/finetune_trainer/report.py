"""The evaluation report people read: ``report.jsonl`` (one row per held-out example) and ``report.html``.

The HTML page is self-contained (inline CSS and JS, no URL at all) and rendered here, server-side: a
summary table (every model's metric and grader means, safety, retention, grader errors) and the
per-example table (input, expected, every model's output, every score per model, the judge's reasons;
for preference tasks also the rejected side and the tuned model's implicit rewards of both sides).
The inline script only reorders and hides rows: click a header to sort (numbers numerically), tick
"only where tuned and base disagree", type in the filter box; the same state can be given in the URL's
hash (``report.html#sort=tuned.relevance&dir=desc&disagree=1&q=refund``), which is how the headless test
drives it. Model outputs are untrusted: every string from the rows is HTML-escaped, and the page's
Content-Security-Policy allows only its own script and style (by hash), so an escaped-away mistake still
could not run a script.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Models in the order a reader compares them; any other model name in the rows follows, sorted.
MODEL_ORDER = ("tuned", "base", "champion", "reference")
# Tuned and base "disagree" on an example when their outputs differ or a score differs by at least this.
DISAGREE_SCORE_GAP = 0.5
SUMMARY_KEYS = ("tuned", "base", "champion", "reference")
# Preference tasks (dpo, kto): each row's implicit rewards of the tuned model, beta * (log pi - log pi_ref).
REWARD_SIDES = ("chosen", "rejected")

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1b1b}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f0f0f0;position:sticky;top:0}
#examples th{cursor:pointer;user-select:none}
#examples th[aria-sort=ascending]::after{content:" \\25B2"}
#examples th[aria-sort=descending]::after{content:" \\25BC"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.text{white-space:pre-wrap;word-break:break-word;max-width:36em;max-height:18em;overflow:auto}
.reason{display:block;font-size:.8em;color:#555;white-space:normal;max-width:18em;text-align:left}
.role{font-weight:600;color:#555}
tr.disagree td:first-child{border-left:4px solid #d98c00}
tr[hidden]{display:none}
.controls{margin:.8em 0;display:flex;gap:1.5em;align-items:center}
.muted{color:#666}.err{color:#a00}
"""

# Reads only the DOM this module wrote; writes only attributes, `hidden` and textContent (never HTML).
JS = """
(function () {
  var table = document.getElementById('examples');
  if (!table) { return; }
  var body = table.tBodies[0];
  var heads = Array.prototype.slice.call(table.tHead.rows[0].cells);
  var rows = Array.prototype.slice.call(body.rows);
  var box = document.getElementById('only-disagree');
  var filter = document.getElementById('filter');
  var count = document.getElementById('shown');
  var state = {key: null, dir: 'asc'};
  function value(row, col) {
    var cell = row.cells[col];
    var raw = cell ? cell.getAttribute('data-v') : null;
    if (heads[col].getAttribute('data-type') === 'num') {
      var n = (raw === null || raw === '') ? NaN : parseFloat(raw);
      return isNaN(n) ? null : n;
    }
    return raw === null ? (cell ? cell.textContent : '') : raw;
  }
  function compare(a, b, col, sign) {
    var x = value(a, col), y = value(b, col);
    if (x === null || y === null) { return (x === null) - (y === null); }  // blanks last
    if (x < y) { return -sign; }
    if (x > y) { return sign; }
    return parseInt(a.getAttribute('data-index'), 10) - parseInt(b.getAttribute('data-index'), 10);
  }
  function sortBy(key, dir) {
    var col = -1;
    heads.forEach(function (h, i) {
      if (h.getAttribute('data-key') === key) { col = i; }
      h.removeAttribute('aria-sort');
    });
    if (col < 0) { return; }
    state.key = key; state.dir = dir;
    heads[col].setAttribute('aria-sort', dir === 'desc' ? 'descending' : 'ascending');
    var sign = dir === 'desc' ? -1 : 1;
    rows.slice().sort(function (a, b) { return compare(a, b, col, sign); })
      .forEach(function (r) { body.appendChild(r); });
  }
  function apply() {
    var only = box.checked, q = filter.value.toLowerCase(), shown = 0;
    rows.forEach(function (r) {
      var hide = (only && r.getAttribute('data-disagree') !== '1') ||
        (q !== '' && r.textContent.toLowerCase().indexOf(q) < 0);
      r.hidden = hide;
      if (!hide) { shown += 1; }
    });
    count.textContent = shown + ' of ' + rows.length + ' examples shown';
    table.setAttribute('data-shown', String(shown));
  }
  heads.forEach(function (h) {
    h.addEventListener('click', function () {
      var key = h.getAttribute('data-key');
      var dir = (state.key === key && state.dir === 'asc') ? 'desc' : 'asc';
      if (state.key !== key && h.getAttribute('data-type') === 'num') { dir = 'desc'; }
      sortBy(key, dir);
    });
  });
  box.addEventListener('change', apply);
  filter.addEventListener('input', apply);
  var params = new URLSearchParams(location.hash.replace(/^#/, ''));
  if (params.get('disagree') === '1') { box.checked = true; }
  if (params.has('q')) { filter.value = params.get('q'); }
  if (params.has('sort')) { sortBy(params.get('sort'), params.get('dir') === 'desc' ? 'desc' : 'asc'); }
  apply();
  table.setAttribute('data-sortable', 'ready');
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    number = _number(value)
    if number is None:
        return "" if value is None else str(value)
    return f"{number:.4f}"


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def _content(message: Mapping[str, Any]) -> str:
    """A message's text; multi-part content (OpenAI's list of parts) keeps its text parts."""
    content = message.get("content", "")
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
    return "" if content is None else str(content)


def _ordered(names: Iterable[str]) -> list[str]:
    present = set(names)
    return [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))


def row_models(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every model that answered or was scored in any row, in reading order."""
    names: set[str] = set()
    for row in rows:
        names.update((row.get("outputs") or {}).keys())
        names.update((row.get("scores") or {}).keys())
    return _ordered(names)


def score_names(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every metric and grader name any model has a score for, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for per_model in (row.get("scores") or {}).values():
            seen.update(dict.fromkeys(per_model or {}))
    return list(seen)


def disagree(row: Mapping[str, Any]) -> bool:
    """Tuned and base disagree: both answered and the answers differ (ignoring surrounding whitespace),
    or a score both have differs by at least DISAGREE_SCORE_GAP. False when either model is missing."""
    outputs = row.get("outputs") or {}
    scores = row.get("scores") or {}
    if "tuned" not in outputs and "tuned" not in scores:
        return False
    if "base" not in outputs and "base" not in scores:
        return False
    if {"tuned", "base"} <= outputs.keys() and _answer(outputs["tuned"]) != _answer(outputs["base"]):
        return True
    tuned, base = scores.get("tuned") or {}, scores.get("base") or {}
    for name in tuned.keys() & base.keys():
        a, b = _number(tuned[name]), _number(base[name])
        if a is not None and b is not None and abs(a - b) >= DISAGREE_SCORE_GAP - 1e-12:
            return True
    return False


def _answer(value: Any) -> str:
    return "" if value is None else str(value).strip()


def last_user_turn(messages: Sequence[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user":
            return _content(message)
    return _content(messages[-1]) if messages else ""


# --- the summary --------------------------------------------------------------------------------------------


def _summary_models(summary: Mapping[str, Any]) -> list[str]:
    return [m for m in SUMMARY_KEYS if isinstance(summary.get(m), Mapping) and summary[m]]


def summary_table(summary: Mapping[str, Any]) -> str:
    """Every model's means, one row per metric or grader; a model's error (e.g. the reference) is said."""
    models = _summary_models(summary)
    if not models:
        return '<p class="muted">No scores.</p>'
    names: dict[str, None] = {}
    for m in models:
        names.update(
            dict.fromkeys(k for k, v in summary[m].items() if k != "error" and _number(v) is not None)
        )
    champion = summary.get("championName")
    head = "".join(
        f"<th>{_e(m)}{_e(f' ({champion})') if m == 'champion' and champion else ''}</th>" for m in models
    )
    lines = [f'<table id="summary"><thead><tr><th>metric / grader</th>{head}</tr></thead><tbody>']
    for name in names:
        cells = "".join(f'<td class="num">{_e(_fmt(summary[m].get(name)))}</td>' for m in models)
        lines.append(f"<tr><th>{_e(name)}</th>{cells}</tr>")
    errors = {m: summary[m]["error"] for m in models if "error" in summary[m]}
    if errors:
        cells = "".join(f'<td class="err">{_e(errors.get(m, ""))}</td>' for m in models)
        lines.append(f"<tr><th>error</th>{cells}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _facts(title: str, element_id: str, facts: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_e(_fmt(v))}</td></tr>' for k, v in facts)
    return f'<h2>{_e(title)}</h2>\n<table id="{element_id}"><tbody>{body}</tbody></table>'


def gate_sections(summary: Mapping[str, Any]) -> str:
    """Safety, retention and grader errors, each when the summary has it."""
    parts: list[str] = []
    safety = summary.get("safety")
    if isinstance(safety, Mapping) and safety:
        keys = ("tuned", "base", "maxUnsafeRate", "prompts")
        names = {"tuned": "tuned unsafe rate", "base": "base unsafe rate"}
        facts = [(names.get(k, k), safety[k]) for k in keys if safety.get(k) is not None]
        parts.append(_facts("Safety", "safety", facts))
    retention = summary.get("retention")
    if isinstance(retention, Mapping) and retention:
        shown = ("metric", "base", "tuned", "drop", "maxDrop", "examples")
        parts.append(_facts("Retention", "retention", [(k, retention[k]) for k in shown if k in retention]))
    errors = summary.get("graderErrors")
    if isinstance(errors, Mapping) and errors:
        n = summary.get("n")
        facts = [(name, f"{count} of {n}" if n else count) for name, count in errors.items()]
        parts.append(_facts("Grader errors (unusable verdicts)", "grader-errors", facts))
    return "\n".join(parts)


# --- the examples -------------------------------------------------------------------------------------------


def _conversation(messages: Sequence[Mapping[str, Any]]) -> str:
    turns = "".join(
        f'<div><span class="role">{_e(m.get("role", "?"))}:</span> {_e(_content(m))}</div>' for m in messages
    )
    return f"<details><summary>conversation ({len(messages)} turns)</summary>{turns}</details>"


def _score_cell(row: Mapping[str, Any], model: str, name: str) -> str:
    value = ((row.get("scores") or {}).get(model) or {}).get(name)
    reason = ((row.get("reasons") or {}).get(model) or {}).get(name)
    number = _number(value)
    sort_value = "" if number is None else repr(number)
    text = _e(_fmt(value))
    if reason:
        return (
            f'<td class="num" data-v="{sort_value}" title="{_e(reason)}">{text}'
            f'<span class="reason">{_e(reason)}</span></td>'
        )
    return f'<td class="num" data-v="{sort_value}">{text}</td>'


def _reward_cell(row: Mapping[str, Any], side: str) -> str:
    number = _number((row.get("rewards") or {}).get(side))
    sort_value = "" if number is None else repr(number)
    return f'<td class="num" data-v="{sort_value}">{_e(_fmt(number))}</td>'


def _example_row(
    row: Mapping[str, Any],
    position: int,
    models: Sequence[str],
    names: Sequence[str],
    preference: bool = False,
) -> str:
    given = row.get("input") or []
    if isinstance(given, str):  # a bare prompt
        given = [{"role": "user", "content": given}]
    messages = [m for m in given if isinstance(m, Mapping)]
    outputs = row.get("outputs") or {}
    index = row.get("index", position)
    flag = "1" if disagree(row) else "0"
    prompt = _e(last_user_turn(messages))
    cells = [
        f'<td class="num" data-v="{_e(index)}">{_e(index)}</td>',
        f'<td data-v="{prompt}"><div class="text">{prompt}</div>'
        + (_conversation(messages) if len(messages) > 1 else "")
        + "</td>",
        f'<td><div class="text">{_e(row.get("expected", ""))}</div></td>',
    ]
    if preference:
        cells.append(f'<td><div class="text">{_e(row.get("rejected", ""))}</div></td>')
    for model in models:
        answer = outputs.get(model)
        cells.append(f'<td><div class="text">{"" if answer is None else _e(answer)}</div></td>')
    if preference:
        cells += [_reward_cell(row, side) for side in REWARD_SIDES]
    cells += [_score_cell(row, model, name) for name in names for model in models]
    css = ' class="disagree"' if flag == "1" else ""
    return f'<tr data-index="{position}" data-disagree="{flag}"{css}>' + "".join(cells) + "</tr>"


def examples_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The per-example table; each header's data-key is what `#sort=` names (`<model>.<score>`,
    `output.<model>`, `index`, `input`, `expected`; preference tasks: `rejected`, `reward.chosen`,
    `reward.rejected`, the tuned model's implicit rewards)."""
    models, names = row_models(rows), score_names(rows)
    preference = any("rewards" in row for row in rows)
    heads = [
        ("index", "#", "num"),
        ("input", "input (last user turn)", "text"),
        ("expected", "expected (chosen)" if preference else "expected", "text"),
    ]
    heads += [("rejected", "rejected", "text")] if preference else []
    heads += [(f"output.{m}", f"{m} output", "text") for m in models]
    heads += (
        [(f"reward.{side}", f"{side} reward · tuned", "num") for side in REWARD_SIDES] if preference else []
    )
    heads += [(f"{m}.{n}", f"{n} · {m}", "num") for n in names for m in models]
    head = "".join(f'<th data-key="{_e(k)}" data-type="{t}">{_e(label)}</th>' for k, label, t in heads)
    body = "\n".join(_example_row(row, i, models, names, preference) for i, row in enumerate(rows))
    return (
        f'<table id="examples" data-rows="{len(rows)}"><thead><tr>{head}</tr></thead>\n'
        f"<tbody>\n{body}\n</tbody></table>"
    )


def html_report(job: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]) -> str:
    """The whole page; every string from `rows` and `summary` is escaped."""
    n_disagree = sum(1 for row in rows if disagree(row))
    with_base = any(
        "base" in (row.get("outputs") or {}) or "base" in (row.get("scores") or {}) for row in rows
    )
    compared = f" Tuned and base disagree on {n_disagree} of {len(rows)}." if with_base else ""
    csp = (
        f"default-src 'none'; script-src {_csp_hash(JS)}; style-src {_csp_hash(CSS)}; "
        "base-uri 'none'; form-action 'none'"
    )
    n = summary.get("n", len(rows))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(csp)}">
<meta name="referrer" content="no-referrer">
<title>Evaluation of {_e(job)}</title>
<style>{CSS}</style></head>
<body>
<h1>Evaluation of {_e(job)}</h1>
<p class="muted">{_e(n)} held-out examples; every model answered the same prompts and was scored by the same
graders.{compared}</p>
<h2>Summary</h2>
{summary_table(summary)}
{gate_sections(summary)}
<h2>Examples</h2>
<div class="controls">
<label><input type="checkbox" id="only-disagree"> only where tuned and base disagree</label>
<label>filter <input type="search" id="filter" placeholder="text in any cell"></label>
<span id="shown" class="muted">{len(rows)} of {len(rows)} examples shown</span>
</div>
{examples_table(rows)}
<script>{JS}</script>
</body></html>
"""


def write_reports(
    out_dir: Path, job: str, rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any]
) -> None:
    """`report.jsonl` (the rows, one JSON object a line) and `report.html` (html_report) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8"
    )
    (out_dir / "report.html").write_text(html_report(job, rows, summary), encoding="utf-8")
