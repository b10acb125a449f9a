"""Render ``results.json`` into ``report.html``, its figures, and a terminal table.

Reads nothing but that document. Every value that reaches the page goes
through :func:`esc` (HTML-escaped, quotes included): the document may come
from a resumed cache or carry a user's file name, so it is text, never markup.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from .files import Folder

VERDICT_COLOURS = {
    "holds": "#1a7f37",
    "does not hold": "#cf222e",
    "inconclusive": "#9a6700",
    "not applicable": "#57606a",
}
TERMINAL_COLOURS = {"holds": "green", "does not hold": "red", "inconclusive": "yellow"}
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
COLOURS = ("#0969da", "#cf222e", "#1a7f37", "#8250df", "#bf8700", "#bf3989", "#57606a")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def show(value: Any) -> str:
    """A number for people: 4 significant digits, thousands separated; text as is."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "—"
    if value in ("inf", "-inf"):
        return "∞" if value == "inf" else "−∞"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "∞" if value > 0 else ("−∞" if value < 0 else "—")
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def summary_table(document: dict[str, Any]) -> Table:
    table = Table(title="optiscope lab: the study sheet's claims, measured")
    table.add_column("claim", no_wrap=True)
    table.add_column("statement", max_width=34)
    table.add_column("verdict", no_wrap=True)
    table.add_column("measured")
    for key, result in document["claims"].items():
        colour = TERMINAL_COLOURS.get(result["verdict"], "dim")
        table.add_row(
            escape(key),
            escape(result["title"]),
            f"[{colour}]{escape(result['verdict'])}[/]",
            escape(result["headline"]),  # "E[h_drop]" is not rich markup
        )
    return table


# -- figures ---------------------------------------------------------------------------


def _floats(values: Iterable[Any]) -> list[float]:
    out = []
    for v in values:
        if v in ("inf", "-inf"):
            out.append(math.inf if v == "inf" else -math.inf)
        else:
            out.append(math.nan if v is None else float(v))
    return out


def _positive(values: list[float]) -> list[float]:
    return [v if v > 0 else math.nan for v in values]


def figure_png(spec: dict[str, Any]) -> bytes:
    """One figure spec drawn with the Figure API: PNG bytes, 700 px wide."""
    fig = Figure(figsize=(7.0, 4.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if spec["type"] == "dots":
        _dots(ax, spec)
    else:
        _lines(ax, spec)
    ax.set_title(spec["title"], fontsize=12)
    ax.set_xlabel(spec.get("xlabel", ""), fontsize=11)
    ax.set_ylabel(spec.get("ylabel", ""), fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _lines(ax: Any, spec: dict[str, Any]) -> None:
    logy = bool(spec.get("logy"))
    measured = theory = 0
    for line in spec["series"]:
        x, y = _floats(line["x"]), _floats(line["y"])
        if logy:
            y = _positive(y)
        if line.get("style") == "theory":
            dash = ("--", ":", "-.")[theory % 3]  # two theory lines stay apart
            theory += 1
            ax.plot(x, y, dash, color="black", linewidth=1.3, label=line["label"])
            continue
        colour, marker = (
            COLOURS[measured % len(COLOURS)],
            MARKERS[measured % len(MARKERS)],
        )
        measured += 1
        few = len(x) <= 40
        style = {
            "color": colour,
            "label": line["label"],
            "linewidth": 1.6,
            "marker": marker if few else None,
            "markersize": 6,
            "markerfacecolor": "white" if measured % 2 == 0 else colour,
            "zorder": 2 + measured,
        }
        if "low" in line and not few:  # a long series: its interval as a band
            ax.plot(x, y, **style)
            ax.fill_between(
                x,
                _floats(line["low"]),
                _floats(line["high"]),
                color=colour,
                alpha=0.15,
                linewidth=0,
            )
        elif "low" in line:
            low, high = _floats(line["low"]), _floats(line["high"])
            below = [
                max(v - lo, 0) if math.isfinite(lo) else math.nan
                for v, lo in zip(y, low, strict=True)
            ]
            above = [
                max(hi - v, 0) if math.isfinite(hi) else math.nan
                for v, hi in zip(y, high, strict=True)
            ]
            ax.errorbar(x, y, yerr=[below, above], capsize=4, **style)
        else:
            ax.plot(x, y, **style)
    if spec.get("logx"):
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=9)


def _dots(ax: Any, spec: dict[str, Any]) -> None:
    values = _floats(spec["values"])
    low, high = _floats(spec["low"]), _floats(spec["high"])
    x = list(range(len(values)))
    below = [
        v - lo if math.isfinite(lo) else math.nan
        for v, lo in zip(values, low, strict=True)
    ]
    above = [
        hi - v if math.isfinite(hi) else math.nan
        for v, hi in zip(values, high, strict=True)
    ]
    ax.errorbar(
        x,
        values,
        yerr=[below, above],
        fmt="o",
        color=COLOURS[0],
        capsize=6,
        markersize=8,
    )
    ax.set_xticks(x, [str(label) for label in spec["labels"]])
    ax.set_xlim(-0.5, len(values) - 0.5)
    if spec.get("ylim_from_zero"):
        ax.set_ylim(bottom=0)


def figures(document: dict[str, Any]) -> dict[str, bytes]:
    """Every figure of the document as PNG bytes, named ``<claim>-<n>.png``."""
    return {
        f"{key}-{i}.png": figure_png(spec)
        for key, result in document["claims"].items()
        for i, spec in enumerate(result.get("figures", []), start=1)
    }


# -- the page ----------------------------------------------------------------------------


def _numbers(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return ""
    rows = []
    for e in entries:
        interval = (
            f"[{show(e['low'])}, {show(e['high'])}]<br><small>{esc(e.get('basis', ''))}</small>"
            if "low" in e
            else ""
        )
        rows.append(
            f"<tr><th scope='row'>{esc(e['label'])}</th><td>{esc(show(e['value']))}</td>"
            f"<td>{interval}</td><td>{esc(e.get('unit', ''))}</td></tr>"
        )
    head = (
        "<tr><th>measurement</th><th>value</th><th>95% interval</th><th>unit</th></tr>"
    )
    return f"<div class='scroll'><table class='numbers'>{head}{''.join(rows)}</table></div>"


def _table(spec: dict[str, Any]) -> str:
    columns = spec["columns"]
    head = "".join(f"<th>{esc(c['label'])}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{esc(show(row.get(c['key'])))}</td>" for c in columns)
        + "</tr>"
        for row in spec["rows"]
    )
    return (
        f"<h3>{esc(spec['title'])}</h3><div class='scroll'><table class='sweep'>"
        f"<tr>{head}</tr>{body}</table></div>"
    )


def _checks(result: dict[str, Any]) -> str:
    if not result["checks"]:
        return ""
    items = "".join(
        f"<li><span class='outcome' style='color:{VERDICT_COLOURS.get(c['outcome'], '#57606a')}'>"
        f"{esc(c['outcome'])}</span>{' <i>(instrument)</i>' if c['role'] == 'instrument' else ''}"
        f": {esc(c['text'])}. Measured {esc(show(c['interval']['estimate']))}, "
        f"interval [{esc(show(c['interval']['low']))}, {esc(show(c['interval']['high']))}].</li>"
        for c in result["checks"]
    )
    return f"<p><b>Criterion.</b></p><ol class='checks'>{items}</ol>"


def _section(
    key: str, result: dict[str, Any], pngs: dict[str, bytes], source: str
) -> str:
    figures = []
    for i, spec in enumerate(result.get("figures", []), start=1):
        data = base64.b64encode(pngs[f"{key}-{i}.png"]).decode()
        caption = esc(spec.get("caption", ""))
        figures.append(
            f"<figure><img alt='{esc(spec['title'])}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{caption}</figcaption></figure>"
        )
    colour = VERDICT_COLOURS.get(result["verdict"], "#57606a")
    reason = (
        f"<p><b>Not applicable.</b> {esc(result['reason'])}</p>"
        if "reason" in result
        else ""
    )
    combination = ""
    if result["checks"]:
        combination = f"<p class='small'>{esc(_combination(result))}</p>"
    return f"""
<section class="claim" id="{esc(key)}">
  <h2>{esc(key)}. {esc(result["title"])}
    <span class="verdict" style="background:{colour}">{esc(result["verdict"])}</span></h2>
  <blockquote>“{esc(result["quote"])}”<br><cite>— {esc(source)}</cite></blockquote>
  <p><b>Method.</b> {esc(result["method"])}</p>
  {reason}
  {_checks(result)}
  {combination}
  <p><b>Measured.</b> {esc(result["headline"])}</p>
  {f"<p><b>Reading.</b> {esc(result['note'])}</p>" if result.get("note") else ""}
  <div class="figures">{"".join(figures)}</div>
  {"".join(_table(t) for t in result.get("tables", []))}
  {_numbers(result.get("numbers", []))}
</section>"""


SEVERITY_COLOURS = {"info": "#57606a", "warning": "#9a6700", "error": "#cf222e"}


def _doctor(doctor: dict[str, Any] | None) -> str:
    """The Doctor section: ``optiscope doctor``'s findings on the lab's own runs."""
    head = "<section id='doctor'><h2>Doctor</h2>"
    if not isinstance(doctor, dict):
        return (
            f"{head}<p>No doctor findings in <code>results.json</code>.</p></section>"
        )
    model = doctor.get("model", {})
    runs = "; ".join(
        f"{esc(r.get('optimizer'))} at lr {esc(show(r.get('lr')))}"
        + (
            f", momentum {esc(show(r['momentum']))}"
            if r.get("momentum") is not None
            else ""
        )
        + f", {esc(show(r.get('steps')))} steps: {esc(show(r.get('findings')))} "
        "finding(s)"
        for r in doctor.get("runs", [])
    )
    counts = ", ".join(
        f"{esc(show(n))} {esc(s)}" for s, n in doctor.get("counts", {}).items()
    )
    rows = []
    for f in doctor.get("findings", []):
        steps = f.get("steps") or []
        evidence = f.get("evidence") or {}
        colour = SEVERITY_COLOURS.get(f.get("severity"), "#57606a")
        rows.append(
            f"<tr><td style='color:{colour}'><b>{esc(f.get('severity'))}</b></td>"
            f"<td>{esc(f.get('title'))}<br><small><code>{esc(f.get('code'))}</code> "
            f"({esc(f.get('source'))})</small></td>"
            f"<td><code>{esc(f.get('scope'))}</code></td>"
            f"<td>{esc('–'.join(show(x) for x in steps))}</td>"
            f"<td>{'<br>'.join(f'{esc(k)} = {esc(show(v))}' for k, v in evidence.items())}"
            f"</td><td>{esc(f.get('threshold'))}<br><small>{esc(f.get('basis'))}"
            f"</small></td><td>{esc(f.get('action'))}</td></tr>"
        )
    table = (
        "<div class='scroll'><table class='doctor'><tr><th>severity</th>"
        "<th>finding</th><th>parameter</th><th>steps</th><th>evidence</th>"
        "<th>threshold and its source</th><th>action</th></tr>"
        f"{''.join(rows)}</table></div>"
        if rows
        else "<p>No findings.</p>"
    )
    return f"""{head}
<p><code>optiscope doctor</code>'s findings on the lab's own training: the digits
MLP ({esc(show(model.get("depth")))} hidden layers of {esc(show(model.get("hidden")))}
units, dropout {esc(show(model.get("dropout")))}, batch {esc(show(model.get("batch")))},
seed {esc(show(model.get("seed")))}) trained with probed optimizers: {runs}.
Findings: {counts}.</p>
<p>A healthy run should show at most <b>info</b> findings; a <b>warning</b> or an
<b>error</b> points at a problem in the training itself.</p>
{table}</section>"""


def _combination(result: dict[str, Any]) -> str:
    """The sentence on how checks combine: the criterion text after its last check."""
    text = result["criterion"]
    marker = "The claim holds when"
    return text[text.index(marker) :] if marker in text else ""


CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 1.5em auto;
       color: #1f2328; line-height: 1.45; padding: 0 1em; font-size: 16px; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3em; margin-top: 2em; }
.verdict { color: white; border-radius: 1em; padding: .1em .7em; font-size: .7em;
           vertical-align: middle; white-space: nowrap; }
blockquote { color: #57606a; border-left: .25em solid #d0d7de; margin: 0;
             padding: 0 1em; font-style: italic; }
cite { font-size: .85em; }
.figures { display: grid; gap: .8em;
           grid-template-columns: repeat(auto-fit, minmax(min(100%, 480px), 1fr)); }
figure { margin: 0; min-width: 0; }
figure img { width: 100%; height: auto; border: 1px solid #d0d7de; display: block;
             box-sizing: border-box; }
figcaption, .small { font-size: .85em; color: #57606a; }
table { border-collapse: collapse; font-size: .9em; max-width: 100%; }
td, th { border: 1px solid #d0d7de; padding: .2em .5em; text-align: left;
         vertical-align: top; overflow-wrap: anywhere; }
table.sweep td { text-align: right; font-variant-numeric: tabular-nums; }
table.numbers td:nth-child(2) { white-space: nowrap; }
.scroll { overflow-x: auto; max-width: 100%; margin: .5em 0; }
code, .wrap { overflow-wrap: anywhere; }
ol.checks li { margin-bottom: .3em; }
.outcome { font-weight: bold; }
table.summary td:nth-child(-n+1), table.summary td:nth-child(3) { white-space: nowrap; }
"""


def render(document: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """The self-contained page: ``pngs`` (from :func:`figures`) are embedded inline."""
    config, run, data = document["config"], document["run"], document["data"]
    source = document["source"]
    claims = document["claims"]
    summary = "".join(
        f"<tr><td><a href='#{esc(k)}'>{esc(k)}</a></td><td>{esc(r['title'])}</td>"
        f"<td style='color:{VERDICT_COLOURS.get(r['verdict'], '#57606a')}'>"
        f"<b>{esc(r['verdict'])}</b></td><td>{esc(r['headline'])}</td></tr>"
        for k, r in claims.items()
    )
    skipped = [
        f"<li><a href='#{esc(k)}'>{esc(k)}</a> {esc(r['title'])}: not applicable, "
        f"{esc(r['reason'])}</li>"
        for k, r in claims.items()
        if "reason" in r
    ] + [f"<li>{esc(k)}: not run (--only)</li>" for k in document.get("not_run", [])]
    skipped_html = (
        f"<h2 id='skipped'>Claims not tested</h2><ul>{''.join(skipped)}</ul>"
        if skipped
        else "<p id='skipped'>Every claim was tested.</p>"
    )
    versions = ", ".join(f"{esc(k)} {esc(v)}" for k, v in run["versions"].items())
    machine = run["machine"]
    resumed = run.get("resumed") or []
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>optiscope lab report</title><style>{CSS}</style></head>
<body><main>
<h1>optiscope lab</h1>
<p>Each claim below quotes {esc(source)} and is measured with optiscope's own
optimizers and dropout. A claim <b>holds</b> or <b>does not hold</b> when the 95%
confidence intervals of its checks decide it, is <b>inconclusive</b> when they do
not, and is <b>not applicable</b> when the data cannot test it. Every number is
read from <code>results.json</code>.</p>
<section id="run"><h2>Run</h2><ul>
<li>Data: {esc(data["name"])}: {esc(show(data["rows_used"]))} of {
        esc(show(data["rows_in_file"]))
    } rows
({esc(show(data["train_rows"]))} training, {
        esc(show(data["validation_rows"]))
    } validation, split by the seed),
{esc(show(data["features_used"]))} of {esc(show(data["features_in_file"]))} features, {
        esc(show(data["classes"]))
    } classes.</li>
<li>Features: {esc(data["preprocessing"])}.</li>
<li>Read as: {esc(data["encoding"])}; SHA-256 <code>{esc(data["sha256"])}</code>.</li>
<li>Seed {esc(config["seed"])}, {"quick" if config["quick"] is True else "full"} run;
started {esc(run["started"])}, {esc(run["wall_time_s"])} s of wall time{
        f", resumed: {esc(', '.join(resumed))}" if resumed else ""
    }.</li>
<li>Versions: {versions}. Machine: {esc(machine["platform"])}, {
        esc(machine["cpus"])
    } CPUs,
{esc(machine["torch_threads"])} torch thread(s).</li>
</ul></section>
<section id="summary"><h2>Summary</h2><div class="scroll"><table class="summary">
<tr><th>claim</th><th>statement</th><th>verdict</th><th>measured</th></tr>{
        summary
    }</table></div>
{skipped_html}<p><a href="#doctor">Doctor</a>: optiscope doctor on the lab's own
training runs.</p></section>
{"".join(_section(k, r, pngs, source) for k, r in claims.items())}
{_doctor(document.get("doctor"))}
</main></body></html>
"""


def write(folder: Folder) -> str:
    """Render ``results.json`` in ``folder`` into report.html and figures/*.png.

    Figures of an earlier run that this one did not draw are removed (only the
    lab's own files). Returns the report's path.
    """
    document = json.loads((folder.root / "results.json").read_text(encoding="utf-8"))
    pngs = figures(document)
    for stale in folder.owned_under("figures"):
        if stale.removeprefix("figures/") not in pngs:
            folder.remove(stale)
    for name, png in pngs.items():
        folder.write(f"figures/{name}", png)
    return str(folder.write("report.html", render(document, pngs)))
