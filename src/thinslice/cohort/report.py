"""The QC page, ``DIR/report.html``: the ledger as a sortable table with a thumbnail strip and flags per case.

One static file (thumbnails inlined as base64 PNG, a few lines of inline JavaScript for sorting, no network
access), so that it can be mailed, archived or opened from a file share as it is.
"""

from __future__ import annotations

import base64
import html
import time
from collections import Counter
from pathlib import Path

from thinslice.io.atomic import write_text_atomic

QC_FOLDER = "qc"
REPORT = "report.html"
# (header, ledger column, numeric) in display order; the thumbnail column comes first.
COLUMNS = (("case", "name", False), ("status", "status", False), ("method", "method", False),
           ("factor", "factor", True), ("DC residual (HU)", "dc_residual_hu", True), ("HU min", "hu_min", True),
           ("seconds", "seconds", True), ("peak MB", "peak_memory_mb", True),
           ("share of body with 90% interval > 50 HU", "wide_fraction", True), ("flags", "flags", False),
           ("reason / warnings", "reason", False))

STYLE = """
body{font:13px system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 4px}
.summary span{margin-right:14px}
table{border-collapse:collapse;margin-top:10px}
th{background:#eee;cursor:pointer;position:sticky;top:0;text-align:left;padding:4px 6px;white-space:nowrap}
th:hover{background:#ddd}
td{border-top:1px solid #ddd;padding:4px 6px;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.reason{max-width:340px;overflow-wrap:anywhere;color:#555}
td.case{max-width:300px;overflow-wrap:anywhere}
.src{color:#777;font-size:11px}
img{display:block;height:150px;cursor:zoom-in}
img.std{height:75px;margin-top:3px}
img.big{height:auto;cursor:zoom-out}
.done{color:#17702b;font-weight:600}.failed{color:#b3261e;font-weight:600}.skipped{color:#777}
.flag{display:inline-block;background:#fde2b3;color:#7a4b00;border-radius:3px;padding:1px 5px;margin:1px;
white-space:nowrap}
"""

SCRIPT = """
document.querySelectorAll('th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0], rows = Array.from(body.rows);
    var up = th.dataset.order !== 'up'; th.dataset.order = up ? 'up' : 'down';
    var key = function (r) { var t = r.cells[col].dataset.v || r.cells[col].textContent.trim();
      return th.dataset.num ? (t === '' ? Infinity : parseFloat(t)) : t.toLowerCase(); };
    rows.sort(function (a, b) { var x = key(a), y = key(b); return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
document.querySelectorAll('img').forEach(function (img) {
  img.addEventListener('click', function () { img.classList.toggle('big'); });
});
"""


def write_report(out_dir: Path, rows: list[dict]) -> Path:
    """Write ``DIR/report.html`` from the ledger rows and the thumbnails in ``DIR/qc``; returns its path."""
    rows = sorted(rows, key=lambda r: ({"failed": 0, "done": 1}.get(str(r.get("status")), 2), r.get("name") or ""))
    counts = Counter(r.get("status") for r in rows)
    summary = " ".join(f"<span>{html.escape(str(s))}: <b>{n}</b></span>" for s, n in sorted(counts.items()))
    flagged = sum(1 for r in rows if r.get("flags"))
    header = "<th></th>" + "".join(f"<th{' data-num=1' if num else ''}>{html.escape(h)}</th>"
                                   for h, _, num in COLUMNS)
    body = "\n".join(_row(out_dir, r) for r in rows)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>thinslice batch: {html.escape(out_dir.name)}"
            f"</title><style>{STYLE}</style></head><body><h1>thinslice batch: {html.escape(str(out_dir))}</h1>"
            f"<div class=summary>{summary}<span>flagged: <b>{flagged}</b></span><span>updated "
            f"{time.strftime('%Y-%m-%d %H:%M')}</span></div>"
            "<p>Thumbnails: thick input (top) and thin output (bottom); axial, coronal, sagittal through the same "
            "point; with --uncertainty, the std map under them (0-60 HU: bright where the network guessed). Click a "
            "thumbnail to enlarge it, a column header to sort.</p>"
            f"<table><thead><tr>{header}</tr></thead><tbody>\n{body}\n</tbody></table>"
            f"<script>{SCRIPT}</script></body></html>\n")
    return write_text_atomic(out_dir / REPORT, page)


def _row(out_dir: Path, row: dict) -> str:
    cells = [f"<td>{_thumbnail(out_dir, row)}</td>"]
    for _, column, numeric in COLUMNS:
        cells.append(_cell(row, column, numeric))
    return "<tr>" + "".join(cells) + "</tr>"


def _cell(row: dict, column: str, numeric: bool) -> str:
    value = row.get(column, "")
    if column == "name":
        label = str(row.get("label") or "")
        text = html.escape(str(value or label))
        source = html.escape(str(row.get("input") or ""))
        return f"<td class=case title='{html.escape(label)}'>{text}<div class=src>{source}</div></td>"
    if column == "status":
        return f"<td class='{html.escape(str(value))}'>{html.escape(str(value))}</td>"
    if column == "flags":
        flags = value if isinstance(value, list) else [f for f in str(value or "").split("; ") if f]
        return "<td>" + "".join(f"<span class=flag>{html.escape(f)}</span>" for f in flags) + "</td>"
    if column == "reason":
        notes = [str(value)] if value else []
        warnings = row.get("warnings")
        notes += [str(w) for w in warnings] if isinstance(warnings, list) else []
        return f"<td class=reason>{'<br>'.join(html.escape(n) for n in notes)}</td>"
    if numeric:
        return f"<td class=num data-v='{html.escape(str(value))}'>{_number(value)}</td>"
    return f"<td class={column}>{html.escape(str(value))}</td>"


def _number(value: object) -> str:
    if value in ("", None):
        return ""
    try:
        number = float(str(value))  # (exact: str of a float is its shortest round-trip repr)
    except (TypeError, ValueError):
        return html.escape(str(value))
    return f"{number:.3g}" if abs(number) < 10 else f"{number:.0f}"


def _thumbnail(out_dir: Path, row: dict) -> str:
    """The case's strip (thick above thin) and, under it, its std map's (when the case made one)."""
    images = []
    for suffix, alt in (("", ""), ("_std", "std")):
        path = out_dir / QC_FOLDER / f"{row.get('name')}{suffix}.png"
        if row.get("status") == "done" and row.get("name") and path.is_file():
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            images.append(f"<img alt='{alt}' title='{alt}' class='{alt}' src='data:image/png;base64,{data}'>")
    return "".join(images)
