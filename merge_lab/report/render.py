"""report.md, a self-contained report.html (plots inlined as base64 PNG, no scripts or network
beyond a tiny check that marks a broken figure), and results.json with per-example results."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import merge_lab.report.plots as plots
import merge_lab.report.tables as tables

TITLES = {"suites": "Per-suite results with 95% confidence intervals", "objectives": "Objectives",
          "quality_cost": "Quality against cost", "routing": "Routing use of MoE candidates"}

SECTIONS = [
    ("Results", tables.quality, "Mean per suite with a 95% percentile bootstrap interval; bold: best. "
     "The oracle picks the best candidate per example: an upper bound, not a real model."),
    ("Best candidate per suite", tables.best, "Paired over the same items: bootstrap CI of the mean gap and "
     "a sign-flip permutation p-value."),
    ("Against the best single source model", tables.paired, "Each candidate minus the best source model on each "
     "suite, paired over items (positive = higher metric); verdict at p < 0.05, direction-aware."),
    ("Objectives", tables.objectives, "Mean of each objective's suites after min-max scaling across candidates "
     "(1 = best candidate, 0 = worst): relative, not absolute."),
    ("Cost", tables.cost, "Measured in the run that produced the results (cached candidates keep their "
     "measurement). Peak memory: rise of process RSS while the candidate ran (CPU), or CUDA peak allocation."),
    ("Suites", tables.suites, None),
    ("Example answers", tables.answers, "The first items of each generation suite: each candidate's greedy answer "
     "and its score (1 = refusal on refusal suites, 1 = win on the win rate). Every item is in results.json."),
]


def _summary(results: dict) -> list[str]:
    lines = list(results.get("notes", []))
    if h := results.get("headline"):
        parts = [f"{a['what']} ({a['candidate']}, {a['mean']:.2f}): {'beats it' if a['beats'] else 'does not beat it'}"
                 for a in h["against"]]
        lines.append(
            f"Headline: {h['candidate']} scores {h['mean']:.2f} on the mean of the objectives "
            f"({', '.join(h['objectives'])}; each scaled 0-1 across candidates). Against the "
            + "; against the ".join(parts) + ". Per-suite paired tests below say which gaps are beyond noise."
        )
    for s, b in results["best"].items():
        if "runner_up" in b and b["diff"] == 0 and b["ci"] == [0, 0]:
            lines.append(f"{s}: {b['candidate']} and {b['runner_up']} tie (identical per-example scores, n={b['n']}).")
        elif "runner_up" in b:
            verdict = "significantly" if b["significant"] else "not significantly (within noise)"
            lines.append(f"{s}: best is {b['candidate']}, {verdict} ahead of {b['runner_up']} (p={b['p']:.3g}, n={b['n']}).")
        else:
            lines.append(f"{s}: only {b['candidate']} was evaluated.")
    return lines


def _notes(results: dict) -> list[str]:
    st = results["settings"]
    return [
        f"Every candidate saw the same items, prompts, chat template ({'on' if st['chat_template'] else 'off'}), "
        f"greedy decoding (max {st['max_new_tokens']} new tokens) and seed {st['seed']}.",
        f"Suites use the '{st['split']}' split of the shipped data (hash-based 60/20/20 split by content; "
        "expert training uses 'train').",
        "Refusals: " + results["refusal_classifier"] + " (misses unusual phrasings).",
        ("Training data proven disjoint from every suite (by id and by normalised request text): "
         + ", ".join(results.get("training_checked", [])) + "." if results.get("training_checked") else
         "No training data was listed or found beside the checkpoints, so overlap was not checked here."),
        f"Confidence intervals: {st['bootstrap']} bootstrap resamples; small n means wide intervals.",
        *[_selection_note(name, sel) for name, sel in results.get("selection", {}).items()],
    ]


def _selection_note(name: str, sel: dict) -> str:
    tried = "; ".join(", ".join(f"{k}={v}" for k, v in t["values"].items()) + f": {t['mean']:.2f}" for t in sel["tried"])
    won = ", ".join(f"{k}={v}" for k, v in sel["chosen"].items())
    n = ", ".join(f"{k} {v}" for k, v in sel["n"].items())
    return (f"{name}: {won} was chosen on the '{sel['split']}' split, never on the evaluation split "
            f"(mean of {', '.join(sel['objectives'])}, scaled 0-1 across the values tried: {tried}; items per suite: {n}).")


def _md_table(t: tables.Table) -> str:
    header, rows = t
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(t: tables.Table) -> str:
    header, rows = t

    def cell(c: str, tag: str) -> str:
        bold = c.startswith("**") and c.endswith("**")
        text = html.escape(c.strip("*") if bold else c)
        return f"<{tag}>{'<b>' + text + '</b>' if bold else text}</{tag}>"

    head = "".join(cell(h, "th") for h in header)
    body = "".join("<tr>" + "".join(cell(c, "td") for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}
.note{color:#555;font-size:13px}.broken{color:#b00;font-weight:bold}"""

# Marks a figure that failed to decode (and logs it), so a reader and the browser test both see it.
CHECK = """window.addEventListener('load',function(){var ok=0;document.querySelectorAll('figure img').forEach(function(i){
if(i.complete&&i.naturalWidth>0){ok++}else{console.error('figure failed to load: '+i.alt);
i.insertAdjacentHTML('afterend','<p class="broken">figure failed to load</p>')}});
document.body.setAttribute('data-figures-ok',ok)});"""


def render_markdown(results: dict, figures: dict[str, str]) -> str:
    out = ["# Comparison report", ""]
    out += ["## Summary", "", *[f"- {x}" for x in _summary(results)], ""]
    for title, fn, note in SECTIONS:
        table = fn(results)
        if table[1]:
            out += [f"## {title}", ""] + ([f"_{note}_", ""] if note else []) + [_md_table(table), ""]
    out += ["## Figures", ""]
    for key, rel in figures.items():
        out += [f"### {TITLES[key]}", "", f"![{TITLES[key]}]({rel})", ""]
    out += ["## How these numbers were made", "", *[f"- {x}" for x in _notes(results)], ""]
    return "\n".join(out)


def render_html(results: dict, pngs: dict[str, bytes]) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>merge_lab comparison report</title>",
             f"<style>{CSS}</style></head><body><h1>Comparison report</h1>", "<h2>Summary</h2><ul>"]
    parts += [f"<li>{html.escape(x)}</li>" for x in _summary(results)] + ["</ul>"]
    for title, fn, note in SECTIONS:
        table = fn(results)
        if not table[1]:
            continue
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if note:
            parts.append(f"<p class='note'>{html.escape(note)}</p>")
        parts.append(_html_table(table))
    parts.append("<h2>Figures</h2>")
    for key, png in pngs.items():
        b64 = base64.b64encode(png).decode()
        parts.append(f"<figure><figcaption>{html.escape(TITLES[key])}</figcaption>"
                     f"<img alt='{key}' src='data:image/png;base64,{b64}'></figure>")
    parts.append("<h2>How these numbers were made</h2><ul>")
    parts += [f"<li>{html.escape(x)}</li>" for x in _notes(results)] + ["</ul>"]
    parts.append(f"<script>{CHECK}</script></body></html>")
    return "".join(parts)


def write_report(results: dict, out: str | Path) -> list[Path]:
    """Write results.json, report.md (+ figures/*.png) and the self-contained report.html."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    pngs = plots.all_plots(results)
    figures = {}
    for key, png in pngs.items():
        (out / "figures" / f"{key}.png").write_bytes(png)
        figures[key] = f"figures/{key}.png"
    files = [out / "results.json", out / "report.md", out / "report.html"]
    files[0].write_text(json.dumps(results, indent=1, default=str))
    files[1].write_text(render_markdown(results, figures))
    files[2].write_text(render_html(results, pngs))
    return files + [out / f for f in figures.values()]
