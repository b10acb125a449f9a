"""Render ``results.json`` into ``report.html`` and a terminal table. Reads nothing else."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from rich.markup import escape
from rich.table import Table

from .._io import atomic_write

VERDICT_COLOURS = {
    "holds": "#1a7f37",
    "does not hold": "#cf222e",
    "inconclusive": "#9a6700",
}


def summary_table(document: dict[str, Any]) -> Table:
    table = Table(title="optiscope lab: the seed's claims, measured")
    table.add_column("claim")
    table.add_column("statement", max_width=34)
    table.add_column("verdict", no_wrap=True)
    table.add_column("measured")
    for key, result in document["claims"].items():
        colour = {"holds": "green", "does not hold": "red"}.get(
            result["verdict"], "yellow"
        )
        table.add_row(
            key,
            result["title"],
            f"[{colour}]{result['verdict']}[/]",
            escape(result["headline"]),  # "E[h_drop]" is not rich markup
        )
    return table


def figure_png(spec: dict[str, Any]) -> bytes:
    """One figure spec (line, scatter or bar) drawn with the Figure API, as PNG bytes."""
    fig = Figure(figsize=(6.4, 3.8), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    kind = spec["type"]
    if kind == "bar":
        ax.bar(
            spec["labels"],
            spec["values"],
            yerr=spec.get("errors"),
            capsize=4,
            color=["#8c959f", "#0969da", "#8250df", "#bf3989"][: len(spec["values"])],
        )
        if spec.get("ylim") == "auto":
            low = min(spec["values"])
            ax.set_ylim(max(0.0, low - 0.05), min(1.0, max(spec["values"]) + 0.02))
        ax.tick_params(axis="x", labelsize=8)
    for series in spec.get("series", []):
        ax.plot(series["x"], series["y"], label=series["label"], linewidth=1.4)
    for points in spec.get("points", []):
        ax.scatter(
            points["x"], points["y"], label=points["label"], s=12, alpha=0.6, zorder=3
        )
    if spec.get("logx"):
        ax.set_xscale("log")
    if spec.get("logy"):
        ax.set_yscale("log")
    ax.set_title(spec["title"], fontsize=10)
    ax.set_xlabel(spec.get("xlabel", ""))
    ax.set_ylabel(spec.get("ylabel", ""), fontsize=9)
    if spec.get("series") or spec.get("points"):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _numbers_html(numbers: dict[str, Any]) -> str:
    rows = []
    for key, value in numbers.items():
        if isinstance(value, list):  # a list of records: its own small table
            columns = list(value[0])
            head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            body = "".join(
                "<tr>" + "".join(f"<td>{r[c]}</td>" for c in columns) + "</tr>"
                for r in value
            )
            value = f"<table class='inner'><tr>{head}</tr>{body}</table>"
        else:
            value = html.escape(str(value))
        rows.append(f"<tr><th>{html.escape(key)}</th><td>{value}</td></tr>")
    return f"<div class='scroll'><table class='numbers'>{''.join(rows)}</table></div>"


def figures(document: dict[str, Any]) -> dict[str, bytes]:
    """Every figure of the document as PNG bytes, named ``<claim>-<n>.png``."""
    return {
        f"{key}-{i}.png": figure_png(spec)
        for key, result in document["claims"].items()
        for i, spec in enumerate(result.get("figures", []), start=1)
    }


def render(document: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """The self-contained page: ``pngs`` (from :func:`figures`) are embedded inline."""
    config = document["config"]
    sections = []
    for key, result in document["claims"].items():
        images = "".join(
            f"<img alt='{html.escape(spec['title'])}' src='data:image/png;base64,"
            f"{base64.b64encode(pngs[f'{key}-{i}.png']).decode()}'>"
            for i, spec in enumerate(result.get("figures", []), start=1)
        )
        colour = VERDICT_COLOURS.get(result["verdict"], "#57606a")
        sections.append(f"""
<section class="claim" id="{key}">
  <h2>{key}. {html.escape(result["title"])}
    <span class="verdict" style="background:{colour}">{html.escape(result["verdict"])}</span></h2>
  <blockquote>{html.escape(result["seed_words"])}</blockquote>
  <p><b>Method.</b> {html.escape(result["method"])}</p>
  <p><b>Criterion.</b> {html.escape(result["criterion"])}</p>
  <p><b>Measured.</b> {html.escape(result["headline"])}</p>
  {f"<p><b>Reading.</b> {html.escape(result['note'])}</p>" if "note" in result else ""}
  <div class="figures">{images}</div>
  {_numbers_html(result["numbers"])}
</section>""")
    summary = "".join(
        f"<tr><td><a href='#{k}'>{k}</a></td><td>{html.escape(r['title'])}</td>"
        f"<td style='color:{VERDICT_COLOURS.get(r['verdict'], '#57606a')}'>"
        f"<b>{html.escape(r['verdict'])}</b></td></tr>"
        for k, r in document["claims"].items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>optiscope lab report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto;
       color: #1f2328; line-height: 1.45; padding: 0 1em; }}
h2 {{ border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }}
.verdict {{ color: white; border-radius: 1em; padding: .1em .7em; font-size: .7em;
            vertical-align: middle; }}
blockquote {{ color: #57606a; border-left: .25em solid #d0d7de; margin: 0;
              padding: 0 1em; font-style: italic; }}
.figures img {{ max-width: 49%; margin: .2em; border: 1px solid #d0d7de; }}
table {{ border-collapse: collapse; font-size: .9em; }}
td, th {{ border: 1px solid #d0d7de; padding: .2em .6em; text-align: left; }}
table.inner td, table.inner th {{ font-size: .85em; }}
.scroll {{ overflow-x: auto; }}
</style></head>
<body>
<h1>optiscope lab</h1>
<p>Data: {html.escape(str(config["data"]))} · seed {config["seed"]} ·
{"quick" if config["quick"] else "full"} run. Every number below is read from
<code>results.json</code>.</p>
<table class="summary"><tr><th>claim</th><th>statement</th><th>verdict</th></tr>{summary}</table>
{"".join(sections)}
</body></html>
"""


def write(results_path: Path, html_path: Path) -> None:
    """Render ``results_path`` into ``html_path``, and each plot into ``figures/`` beside it."""
    document = json.loads(Path(results_path).read_text())
    pngs = figures(document)
    folder = html_path.parent / "figures"
    folder.mkdir(exist_ok=True)
    for name, png in pngs.items():
        atomic_write(folder / name, png)
    atomic_write(html_path, render(document, pngs))
