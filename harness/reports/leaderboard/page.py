"""index.html: the leaderboard as one self-contained page (inline CSS and script, plots as base64 PNGs:
it opens offline), with tables sorted by clicking a header."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

import numpy as np
import pandas as pd

from .loading import Run
from .markdown import caveats, column_notes, protocol_lines, rank_note
from .ranking import Rule
from .tables import cell_view, ranking_view


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
th[data-order="asc"]::after { content: " ▲"; } th[data-order="desc"]::after { content: " ▼"; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; } figcaption { color: #555; font-size: 0.9em; }
"""

# Clicking a header sorts its table's rows by that column (numbers by value, missing values last);
# clicking again reverses the order.
SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var asc = th.getAttribute("data-order") !== "asc";
    function key(row) {
      var cell = row.cells[col], v = cell.getAttribute("data-sort");
      if (v === null) return cell.textContent;
      return v === "" ? null : parseFloat(v);
    }
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (x === null || y === null) return (x === null) - (y === null);
      var d = typeof x === "number" ? x - y : String(x).localeCompare(String(y));
      return asc ? d : -d;
    });
    table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
    th.setAttribute("data-order", asc ? "asc" : "desc");
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def html_table(text: pd.DataFrame, raw: pd.DataFrame, table_id: str) -> str:
    """A sortable table: the shown text, and numeric cells' raw values in `data-sort`."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in text.columns)
    body = []
    for i in range(len(text)):
        cells = []
        for column in text.columns:
            shown, value = text[column].iloc[i], raw[column].iloc[i]
            if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
                number = "" if pd.isna(value) else repr(float(value))
                cells.append(f'<td class="num" data-sort="{number}">{html.escape(str(shown))}</td>')
            else:
                cells.append(f"<td>{html.escape(str(shown))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="{table_id}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _inline_markdown(text: str) -> str:
    """`code` and **bold** of our own sentences, escaped."""
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def write_html(path: Path, runs: list[Run], summary: pd.DataFrame, ranked: pd.DataFrame, rule: Rule,
               plots: list[tuple[Path, str]]) -> None:
    ranking = html_table(*ranking_view(ranked, rule), "ranking")
    cells = html_table(*cell_view(ranked, rule), "cells")
    figures = "".join(
        f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
        f'{base64.b64encode(png.read_bytes()).decode()}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        for png, caption in plots)
    notes = "".join(f"<li>{_inline_markdown(n)}</li>" for n in column_notes(runs))
    protocol = "".join(f"<p>{_inline_markdown(line)}</p>" for line in protocol_lines(runs, summary))
    warnings = "".join(f"<p><em>{_inline_markdown(c)}</em></p>" for c in caveats(runs, ranked))
    path.write_text(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Visual-token pruning leaderboard</title><style>{STYLE}</style></head><body>"
        f"<h1>Visual-token pruning leaderboard</h1>{protocol}"
        f"<p><strong>Ranking rule.</strong> {_inline_markdown(rule.describe())} "
        f"{_inline_markdown(rank_note(ranked, rule))} "
        "Click a header to sort.</p>"
        f"{warnings}{ranking}<h2>Every cell</h2>"
        f"<p>The unpruned reference (<code>none</code>) first, then each method's budgets.</p>"
        f"{cells}<ul>{notes}</ul><h2>Plots</h2>{figures}"
        f"<script>{SORT_SCRIPT}</script></body></html>\n")
