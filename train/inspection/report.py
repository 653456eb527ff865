"""``report.html``: the page people open after ``cubcam evaluate``, ``explain`` or ``compare``.

One self-contained file that opens from the disk in any browser, without a server or a network: the data is JSON
inlined in the page (``fetch()`` of a sibling file fails under ``file://``), the script and styles are inline (no
CDN), and the pictures are files beside it (``report_files/``: thumbnails, loaded lazily) or the plots the command
wrote. Tables sort by any column (click its header); a gallery sorts by its buttons, worst first by default.
Every name reaches the page as data and the script writes it as text (``textContent``): a class name never becomes
markup. ``report.html?selftest`` clicks every header and button and writes the orders it got into the page, which a
headless browser's ``--dump-dom`` reads back (``tests/train/test_report.py``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cubcam.cams.files import write_text

FILES = "report_files"  # the folder of the page's thumbnails, beside it
ColumnKind = Literal["text", "number", "percent", "delta"]  # delta: a signed percentage-point change, coloured


@dataclass
class Column:
    key: str
    label: str
    kind: ColumnKind = "percent"


@dataclass
class Table:
    """A sortable table; rows are dicts keyed by the columns' keys (a missing or None value is an empty cell).
    ``marked``: the key of a row field that marks a row (a baseline: shaded, with its value as a tag)."""

    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    note: str = ""
    marked: str = ""


@dataclass
class Picture:
    """A plot or a figure: ``src`` relative to the page (a file the command wrote beside it)."""

    title: str
    src: str
    note: str = ""


@dataclass
class Sort:
    key: str
    label: str
    descending: bool = False


@dataclass
class Gallery:
    """Tiles with a caption each, sortable by ``sorts`` (the first is the default order). An item has an ``id``,
    ``src`` (or ``srcs``: tiles side by side, e.g. two checkpoints' maps), ``caption`` (lines) and the sort keys'
    values."""

    title: str
    items: list[dict[str, Any]]
    sorts: list[Sort]
    note: str = ""


@dataclass
class Section:
    title: str
    parts: list[Table | Picture | Gallery] = field(default_factory=list)
    text: str = ""


@dataclass
class Page:
    title: str
    facts: list[tuple[str, str]]  # (what, value): the command, the checkpoint, the split ...
    sections: list[Section]


def write_page(path: Path, page: Page) -> Path:
    """Write ``page`` as one HTML file (atomically: a failed write leaves the previous page)."""
    return write_text(path, render(page))


def render(page: Page) -> str:
    """The page's HTML: the data as inlined JSON, the script and the styles inline."""
    data = {"title": page.title, "facts": page.facts, "sections": [_section(s) for s in page.sections]}
    # Inside <script>: "<" as \u003c, so no value (a class name "</script>") can end the block.
    payload = json.dumps(_clean(data), separators=(",", ":"), allow_nan=False)
    payload = payload.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    title = page.title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _TEMPLATE.replace("{title}", title).replace("{data}", payload)


@contextlib.contextmanager
def files_folder(out: Path) -> Iterator[Path]:
    """A new, empty folder to write the page's files into, which replaces ``out/report_files`` whole when the block
    ends without an error (a failed or interrupted run leaves the previous files, and no half-written folder)."""
    final = out / FILES
    fresh = out / f".{FILES}.{os.getpid()}.partial"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    try:
        yield fresh
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    old = out / f".{FILES}.{os.getpid()}.old"
    if final.exists():
        final.rename(old)
    fresh.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def tables_and_plots(page: Page, folder: Path) -> Page:
    """``page`` without its galleries and with its pictures inlined (from ``folder``): one HTML file that shows
    everything alone, as a W&B HTML panel (``wandb.Html`` uploads the HTML, not the files beside it)."""
    sections = []
    for section in page.sections:
        parts: list[Table | Picture | Gallery] = []
        for part in section.parts:
            if isinstance(part, Picture) and (folder / part.src).is_file():
                parts.append(Picture(part.title, inline(folder / part.src), part.note))
            elif isinstance(part, Table):
                parts.append(part)
        if parts:
            sections.append(Section(section.title, parts, section.text))
    return Page(page.title, page.facts, sections)


def inline(path: Path) -> str:
    """A PNG as a data URI: a page with no files beside it (a W&B HTML panel uploads the HTML alone)."""
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _section(section: Section) -> dict[str, Any]:
    parts = []
    for part in section.parts:
        kind = {Table: "table", Picture: "picture", Gallery: "gallery"}[type(part)]
        parts.append({"kind": kind, **asdict(part)})
    return {"title": section.title, "text": section.text, "parts": parts}


def _clean(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has neither: an empty cell) and numpy scalars as numbers."""
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


_TEMPLATE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1400px;
       padding: 16px 24px; color: #1d1d1f; }
h1 { font-size: 22px; margin: 8px 0; } h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 16px 0 6px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; margin: 0; }
dl.facts dt { color: #666; } dl.facts dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
.note { color: #555; margin: 4px 0 8px; max-width: 980px; }
.wrap { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid #eee; text-align: right; white-space: nowrap; }
th { cursor: pointer; user-select: none; background: #f6f6f6; position: sticky; top: 0; }
th:first-child, td:first-child { text-align: left; }
th[aria-sort=ascending]::after { content: " \25B2"; } th[aria-sort=descending]::after { content: " \25BC"; }
tr.marked td { background: #f3f3f8; color: #555; }
.tag { font-size: 11px; background: #e2e2ee; border-radius: 3px; padding: 0 4px; margin-left: 6px; }
.up { color: #0a7d22; } .down { color: #b3261e; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.sorts button { margin: 0 6px 8px 0; padding: 3px 10px; border: 1px solid #bbb; background: #fff;
                border-radius: 4px; cursor: pointer; }
.sorts button.on { background: #1d1d1f; color: #fff; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)); gap: 10px; }
.gallery.pairs { grid-template-columns: repeat(auto-fill, minmax(270px, 1fr)); }
figure { margin: 0; content-visibility: auto; contain-intrinsic-size: 140px 220px; }
figure .tiles { display: flex; gap: 4px; } figure img { width: 128px; height: 128px; background: #eee; }
figcaption { font-size: 12px; line-height: 1.3; white-space: pre-line; overflow-wrap: anywhere; }
.more { margin: 10px 0; }
</style>
</head>
<body>
<h1 id="title"></h1>
<dl class="facts" id="facts"></dl>
<main id="main"></main>
<pre id="selftest" hidden></pre>
<script type="application/json" id="data">{data}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const PAGE = 300;  // gallery tiles drawn at a time: a CUB split's 5,794 stay quick to sort
function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) node.append(child);
  return node;
}
function cell(value, kind) {
  if (value === null || value === undefined) return "";
  if (typeof value !== "number") return String(value);
  if (kind === "percent") return (100 * value).toFixed(1);
  if (kind === "delta") return (value > 0 ? "+" : value < 0 ? "\u2212" : "\u00b1") + Math.abs(100 * value).toFixed(1);
  return Number.isInteger(value) ? String(value) : value.toFixed(3);
}
function compare(a, b, key, descending) {
  const x = a[key], y = b[key];
  const missing = (v) => v === null || v === undefined;
  if (missing(x) || missing(y)) return missing(x) - missing(y);  // empty cells last, either way
  const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
  return descending ? -order : order;
}
function table(part) {
  let rows = part.rows.slice();
  const body = el("tbody");
  const heads = part.columns.map((column) => el("th", {textContent: column.label, scope: "col"}));
  function fill() {
    body.replaceChildren(...rows.map((row) => {
      const tr = el("tr");
      if (part.marked && row[part.marked]) tr.className = "marked";
      part.columns.forEach((column, i) => {
        const td = el("td", {textContent: cell(row[column.key], column.kind)});
        if (column.kind === "delta" && typeof row[column.key] === "number" && row[column.key] !== 0)
          td.className = row[column.key] > 0 ? "up" : "down";
        if (i === 0 && part.marked && row[part.marked])
          td.append(el("span", {className: "tag", textContent: row[part.marked]}));
        tr.append(td);
      });
      return tr;
    }));
  }
  heads.forEach((th, i) => th.addEventListener("click", () => {
    const descending = th.getAttribute("aria-sort") === "ascending";
    heads.forEach((other) => other.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", descending ? "descending" : "ascending");
    rows = part.rows.slice().sort((a, b) => compare(a, b, part.columns[i].key, descending));  // ties: page order
    fill();
  }));
  fill();
  const node = el("div", {className: "wrap"}, el("table", {}, el("thead", {}, el("tr", {}, ...heads)), body));
  node.sortBy = (i) => { heads[i].click(); return rows.map((row) => row[part.columns[0].key]); };
  node.headers = heads.length;
  return node;
}
function gallery(part) {
  let items = part.items.slice(), shown = 0;
  const grid = el("div", {className: "gallery" + (part.items.some((item) => item.srcs) ? " pairs" : "")});
  const more = el("button", {className: "more", textContent: "show more"});
  function figure(item) {
    const sources = item.srcs || [item.src];
    const tiles = el("div", {className: "tiles"},
      ...sources.map((src) => el("img", {src: src, loading: "lazy", alt: item.caption.split("\n")[0]})));
    return el("figure", {}, tiles, el("figcaption", {textContent: item.caption}));
  }
  function draw(reset) {
    if (reset) { grid.replaceChildren(); shown = 0; }
    const next = items.slice(shown, shown + PAGE);
    grid.append(...next.map(figure));
    shown += next.length;
    more.hidden = shown >= items.length;
    more.textContent = `show more (${items.length - shown} left)`;
  }
  more.addEventListener("click", () => draw(false));
  const buttons = part.sorts.map((sort) => el("button", {textContent: sort.label}));
  part.sorts.forEach((sort, i) => buttons[i].addEventListener("click", () => {
    buttons.forEach((b) => b.classList.remove("on"));
    buttons[i].classList.add("on");
    items = part.items.slice().sort((a, b) => compare(a, b, sort.key, sort.descending));  // ties: page order
    draw(true);
  }));
  const node = el("div", {}, el("div", {className: "sorts"}, "sort: ", ...buttons), grid, more);
  node.sortBy = (i) => { buttons[i].click(); return items.map((item) => item.id); };
  node.buttons = buttons.length;
  node.count = () => items.length;
  if (buttons.length) buttons[0].click(); else draw(true);
  return node;
}
function picture(part) {
  return el("img", {className: "plot", src: part.src, alt: part.title, loading: "lazy"});
}
document.getElementById("title").textContent = DATA.title;
for (const [what, value] of DATA.facts)
  document.getElementById("facts").append(el("dt", {textContent: what}), el("dd", {textContent: value}));
const made = [];
for (const section of DATA.sections) {
  const main = document.getElementById("main");
  main.append(el("h2", {textContent: section.title}));
  if (section.text) main.append(el("p", {className: "note", textContent: section.text}));
  for (const part of section.parts) {
    if (part.title) main.append(el("h3", {textContent: part.title}));
    if (part.note) main.append(el("p", {className: "note", textContent: part.note}));
    const node = {table: table, gallery: gallery, picture: picture}[part.kind](part);
    made.push([part, node]);
    main.append(node);
  }
}
if (new URLSearchParams(location.search).has("selftest")) {
  const result = {tables: [], galleries: []};
  for (const [part, node] of made) {
    if (part.kind === "table") {
      const orders = [];
      for (let i = 0; i < node.headers; i++) orders.push(node.sortBy(i), node.sortBy(i));  // ascending, descending
      result.tables.push({title: part.title, orders: orders});
    } else if (part.kind === "gallery") {
      const orders = [];
      for (let i = 0; i < node.buttons; i++) orders.push(node.sortBy(i));
      node.sortBy(0);
      result.galleries.push({title: part.title, count: node.count(), orders: orders,
                             drawn: node.querySelectorAll("figure").length});
    }
  }
  const out = document.getElementById("selftest");
  out.textContent = JSON.stringify(result);
  out.hidden = false;
}
</script>
</body>
</html>
"""
