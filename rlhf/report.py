"""One self-contained HTML page: sortable tables and figures, every image embedded as a data
URI and the sorting done by a few lines of inline script, so the file opens anywhere - from
disk, attached to a message, with no network access - and shows the same thing. And the same
tables as CSV files (`write_csv`).
"""

import base64
import csv
import html
from pathlib import Path

from rlhf.errors import UserError

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0 2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; cursor: pointer; user-select: none; }
td.text, th:first-child { text-align: left; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
figure { margin: 1em 0 2em; } figcaption { font-size: 0.9em; color: #555; }
img { max-width: 100%; }
"""

# Click a header to sort by that column (numbers as numbers, "-" last); click again to reverse.
SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, column) {
    th.addEventListener("click", function () {
      var ascending = !th.classList.contains("sorted-asc");
      table.querySelectorAll("th").forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(ascending ? "sorted-asc" : "sorted-desc");
      var body = table.tBodies[0], rows = Array.from(body.rows);
      function key(row) { var text = row.cells[column].textContent.trim(), n = parseFloat(text);
        return text === "-" || text === "" ? null : (isNaN(n) ? text : n); }
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === null) return 1; if (y === null) return -1;
        var order = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
        return ascending ? order : -order;
      });
      rows.forEach(function (row) { body.appendChild(row); });
    });
  });
});
"""


def table(header: list, rows: list) -> str:
    """A sortable HTML table of `rows` (lists of cells, already formatted as text)."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join("<tr>" + "".join(cell_html(cell) for cell in row) + "</tr>\n" for row in rows)
    return f'<table class="sortable"><thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody></table>'


def cell_html(cell) -> str:
    """Numbers right-aligned (they line up), text left-aligned."""
    text = str(cell)
    try:
        float(text)
        return f"<td>{html.escape(text)}</td>"
    except ValueError:
        return f'<td class="text">{html.escape(text)}</td>'


def figure(png: bytes, caption: str) -> str:
    """A PNG embedded in the page (a data URI: no file beside the page, no network)."""
    data = base64.b64encode(png).decode("ascii")
    image = f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
    return f"<figure>{image}<figcaption>{html.escape(caption)}</figcaption></figure>"


def page(title: str, sections: list) -> str:
    """The whole document: `sections` are (heading, HTML) pairs in order."""
    parts = "\n".join(f"<h2>{html.escape(heading)}</h2>\n{content}" for heading, content in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{parts}\n<script>{SCRIPT}</script></body></html>\n"
    )


def write_csv(path: Path, columns: list, rows: list) -> None:
    """A table as CSV: a header of `columns`, then one line per row (a dict; missing cells empty)."""
    try:
        with Path(path).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), restval="")
            writer.writeheader()
            writer.writerows(rows)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or err}") from None
