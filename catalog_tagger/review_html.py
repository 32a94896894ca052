"""The review as one self-contained web page, for people who review in a browser.

Thumbnails are inline (base64 JPEG data URIs), so the page works from a mail attachment
or a USB stick with no server. Each row has a select of the class names and ``other``;
choices are kept in the browser's localStorage (a reload loses nothing), and a button
downloads them as ``image_id,path,correct_label,why`` CSV, which ``learn`` reads
(``why`` tells it which rows are the random slice).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .review import ReviewItem

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1em; }}
table {{ border-collapse: collapse; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: middle; }}
thead th {{ position: sticky; top: 0; background: #eee; }}
td.path {{ font-size: 80%; color: #555; }}
tr.done {{ background: #f1fff1; }}
</style></head><body>
<p><b>{instructions}</b></p>
<p><button id="download" type="button">Download labels (CSV)</button> <span id="count"></span></p>
<table id="review"><thead><tr><th>photo</th><th>correct_label</th><th>label</th><th>confidence</th>
<th>top-k</th><th>why</th><th>image_id</th><th>path</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<script>
const CLASSES = {classes};
const KEY = "catalog-tagger-review:" + {key};
const NEW_CLASS = "\u0000new";  // the menu entry that asks for a name of the reviewer's own
const saved = JSON.parse(localStorage.getItem(KEY) || "{{}}");
const own = JSON.parse(localStorage.getItem(KEY + ":classes") || "[]");
const selects = document.querySelectorAll("select.label");
function option(name, text) {{
  const opt = document.createElement("option");
  opt.value = name; opt.textContent = text || name;
  return opt;
}}
function addOwn(name) {{
  own.push(name); localStorage.setItem(KEY + ":classes", JSON.stringify(own));
  for (const sel of selects) sel.insertBefore(option(name), sel.lastChild);
}}
for (const sel of selects) {{
  for (const name of ["", ...CLASSES, ...own]) sel.appendChild(option(name, name || "(not reviewed)"));
  sel.appendChild(option(NEW_CLASS, "class of your own\u2026"));
  const id = sel.closest("tr").dataset.path;
  if (saved[id]) sel.value = saved[id];
  sel.addEventListener("change", () => {{
    if (sel.value === NEW_CLASS) {{
      const typed = (prompt("Name of the class (learn it with --new-classes), e.g. Watch:") || "").trim();
      if (typed && !CLASSES.includes(typed) && !own.includes(typed)) addOwn(typed);
      sel.value = typed || saved[id] || "";
    }}
    saved[id] = sel.value; localStorage.setItem(KEY, JSON.stringify(saved)); update();
  }});
}}
function csvField(s) {{ return /[",\\r\\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s; }}
function labelsCsv() {{
  const lines = ["image_id,path,correct_label,why"];
  for (const tr of document.querySelectorAll("#review tbody tr")) {{
    const value = tr.querySelector("select.label").value;
    lines.push([tr.dataset.id, tr.dataset.path, value, tr.dataset.why].map(csvField).join(","));
  }}
  return lines.join("\\r\\n") + "\\r\\n";
}}
function update() {{
  let n = 0;
  for (const tr of document.querySelectorAll("#review tbody tr")) {{
    const done = tr.querySelector("select.label").value !== "";
    tr.classList.toggle("done", done); n += done;
  }}
  document.getElementById("count").textContent = n + " of " + {total} + " labelled";
}}
document.getElementById("download").addEventListener("click", () => {{
  const blob = new Blob([labelsCsv()], {{type: "text/csv"}});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob); a.download = {download};
  document.body.appendChild(a); a.click(); a.remove();
}});
update();
</script>
</body></html>
"""


def write_review_html(out: Path, items: Sequence[ReviewItem], classes: Sequence[str], thumbnail_size: int) -> None:
    """Write the review page atomically."""
    from .review import OTHER, thumbnails
    from .workbook import INSTRUCTIONS, atomic_write

    rows = []
    for item, jpeg in zip(items, thumbnails([i.path for i in items], thumbnail_size)):
        img = (f'<img alt="" width="{thumbnail_size}" src="data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}">'
               if jpeg is not None else "(no preview)")
        topk = ", ".join(f"{html.escape(label)} {score:.2f}" for label, score in item.topk)
        rows.append(
            f'<tr data-id="{html.escape(item.image_id)}" data-path="{html.escape(item.path)}" '
            f'data-why="{html.escape(item.why)}">'
            f'<td>{img}</td><td><select class="label"></select></td><td>{html.escape(item.label)}</td>'
            f"<td>{item.confidence:.3f}</td><td>{topk}</td><td>{html.escape(item.why)}</td>"
            f'<td>{html.escape(item.image_id)}</td><td class="path">{html.escape(item.path)}</td></tr>'
        )
    instructions = INSTRUCTIONS.format(other=OTHER).replace("correct_label column (drop-down)", "correct_label menu")
    instructions = instructions.replace("THIS_FILE", "THE_DOWNLOADED.csv")
    page = _PAGE.format(
        title=html.escape(f"Review: {Path(out).name}"), instructions=html.escape(instructions),
        rows="\n".join(rows), classes=_js(list(classes) + [OTHER]), key=_js(Path(out).name),
        total=len(items), download=_js(Path(out).stem + "-labels.csv"),
    )
    atomic_write(Path(out), page.encode("utf-8"))


class _RowReader(HTMLParser):
    """The photos of a review page: its rows' ``data-id`` and ``data-path``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "tr" and values.get("data-path") is not None:
            self.rows.append((values.get("data-id") or "", values["data-path"] or ""))


def read_review_html(path: Path) -> list[tuple[str, str]]:
    """(image_id, path) of every photo a review page asks about, as ``write_review_html`` wrote it."""
    reader = _RowReader()
    reader.feed(Path(path).read_text("utf-8", errors="replace"))
    reader.close()
    return reader.rows


def _js(value: object) -> str:
    """JSON for a <script> block: '</' cannot end the script early."""
    return json.dumps(value).replace("</", "<\\/")
