"""report.md, a self-contained report.html (plots inlined as base64 PNG, no scripts or network
beyond a tiny check that marks a broken figure), and results.json with per-example results."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import merge_lab.report.plots as plots
import merge_lab.report.summary as summary
import merge_lab.report.tables as tables

TITLES = {"suites": "Per-suite results with 95% confidence intervals",
          "objectives": "Objectives (relative: 1 = best candidate in this file)",
          "quality_cost": "Headline score against cost", "routing": "Routing use of MoE candidates"}
LEAD_FIGURES = ("quality_cost", "objectives")  # right after the verdict; the rest after the tables

# (title, table, note, folded): the long per-suite tables are folded
SECTIONS = [
    ("Headline scores", tables.headline_scores, "Reference-anchored (see the definition above): a candidate's "
     "score depends only on itself and the declared references, not on the other candidates.", False),
    ("Candidates by group", tables.groups, "The `group:` of each candidate in the compare file (e.g. the fused "
     "model's ablations, the baselines with the same training), with its headline score; the verdict tests the "
     "headline candidate against the best of each group.", False),
    ("Training of the same-training baselines", tables.training, "Worked out from the recipes, not typed: "
     "multitask gets the experts' and the fusion's steps summed, as many rows per step on average, the union of "
     "their rows and at least their trainable parameters in one LoRA; merge_then_train gets the fusion's rows, "
     "steps, learning rate and LoRA. Both train with merge-lab align's schedule; their rows are checked disjoint "
     "from every suite.", False),
    ("Cost", tables.cost, "Measured in the run that produced the results (cached candidates keep their "
     "measurement). Peak memory: rise of process RSS while the candidate ran (CPU), or CUDA peak allocation.", False),
    ("Objectives (relative)", tables.objectives, "Mean of each objective's suites after min-max scaling across "
     "the candidates in this file (1 = best candidate, 0 = worst): relative, it moves when a candidate is added; "
     "the headline scores above do not.", False),
    ("Results per suite", tables.quality, "Mean per suite with a 95% percentile bootstrap interval; bold: best. "
     "The oracle picks the best candidate per example: an upper bound, not a real model.", True),
    ("Best candidate per suite", tables.best, "Paired over the same items: bootstrap CI of the mean gap and "
     "a sign-flip permutation p-value, Holm-corrected over the suites; better/worse only when the corrected p < "
     "alpha and the interval excludes 0.", True),
    ("Headline candidate per suite", tables.headline_suites, "The headline candidate minus each comparator on "
     "each suite, in the suite's own units; Holm over every row.", True),
    ("Against the best single source model", tables.paired, "Each candidate minus the best source model on each "
     "suite, paired over items (positive = higher metric); Holm over every row, direction-aware verdict.", True),
    ("Suites", tables.suites, None, True),
    ("Example answers", tables.answers, "The first items of each generation suite: each candidate's greedy answer "
     "and its score (1 = refusal on refusal suites, 1 = win on the win rate). Every item is in results.json.", True),
]


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
        *([f"Evaluated by {results['processes']} processes (accelerate launch), each scoring and generating its "
           "share of every suite's batches; per-example results are those of one process."]
          if results.get("processes", 1) > 1 else []),
        *[_selection_note(name, sel) for name, sel in results.get("selection", {}).items()],
    ]


def _selection_note(name: str, sel: dict) -> str:
    if "as" in sel:
        won = ", ".join(f"{k}={v}" for k, v in sel["chosen"].items())
        return f"{name}: {won}, the value chosen for {sel['as']} (`choose_as`), not chosen again."
    tried = "; ".join(", ".join(f"{k}={v}" for k, v in t["values"].items()) + f": {t['score']:.2f}"
                     + (f" [{t['interval'][0]:.2f}, {t['interval'][1]:.2f}]" if t.get("interval") else "")
                     for t in sel["tried"])
    won = ", ".join(f"{k}={v}" for k, v in sel["chosen"].items())
    n = ", ".join(f"{k} {v}" for k, v in sel["n"].items())
    score = sel["score"]
    how = (f"reference-anchored headline score (base {score['base']} = 0, best source = 1)" if score["kind"] == "headline"
           and score["scale"] == "source" else "reference-anchored headline score (z scale on the base)"
           if score["kind"] == "headline" else "mean raw suite score per objective (no verdict references)")
    return (f"{name}: {won} was chosen on the '{sel['split']}' split, never on the evaluation split, by the {how} "
            f"over {', '.join(sel['objectives'])}, which depends on no other value tried: {tried}; "
            f"items per suite: {n}.")


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
#verdict{border:2px solid #333;padding:.2em 1em;margin:1em 0;background:#fafafa}#verdict .lead{font-size:16px;font-weight:600}
details{margin:.4em 0 1em}summary{cursor:pointer;font-weight:600;font-size:17px}
.note{color:#555;font-size:13px}.broken{color:#b00;font-weight:bold}"""

# Marks a figure that failed to decode (and logs it), so a reader and the browser test both see it;
# records where the verdict block starts, so the browser test can check it is in the first screen.
CHECK = """window.addEventListener('load',function(){var ok=0;document.querySelectorAll('figure img').forEach(function(i){
if(i.complete&&i.naturalWidth>0){ok++}else{console.error('figure failed to load: '+i.alt);
i.insertAdjacentHTML('afterend','<p class="broken">figure failed to load</p>')}});
var v=document.getElementById('verdict');if(v){var r=v.getBoundingClientRect();
document.body.setAttribute('data-verdict-top',Math.round(r.top+window.scrollY));
document.body.setAttribute('data-viewport-height',window.innerHeight)}
document.body.setAttribute('data-figures-ok',ok)});"""


def _md_verdict(results: dict) -> list[str]:
    v = summary.verdict(results)
    out = ["## Verdict", "", f"**{v.lead}**", ""]
    if v.table[1]:
        out += [_md_table(v.table), ""]
    out += [f"- {x}" for x in v.points] + ([""] if v.points else [])
    return out


def render_markdown(results: dict, figures: dict[str, str]) -> str:
    out = ["# Comparison report", "", *_md_verdict(results)]
    out += [f"- {x}" for x in results.get("notes", [])] + ([""] if results.get("notes") else [])
    if text := summary.definition(results):
        out += ["## What the headline score is", "", text, ""]
    for key in (k for k in LEAD_FIGURES if k in figures):
        out += [f"## {TITLES[key]}", "", f"![{TITLES[key]}]({figures[key]})", ""]
    out += ["## Per suite", "", *[f"- {x}" for x in summary.suite_sentences(results)], ""]
    for title, fn, note, folded in SECTIONS:
        table = fn(results)
        if not table[1]:
            continue
        body = ([f"_{note}_", ""] if note else []) + [_md_table(table), ""]
        if folded:
            out += [f"<details><summary>{title}</summary>", "", *body, "</details>", ""]
        else:
            out += [f"## {title}", "", *body]
    rest = [k for k in figures if k not in LEAD_FIGURES]
    if rest:
        out += ["## More figures", ""]
        for key in rest:
            out += [f"### {TITLES[key]}", "", f"![{TITLES[key]}]({figures[key]})", ""]
    out += ["## How these numbers were made", "", *[f"- {x}" for x in _notes(results)], ""]
    return "\n".join(out)


def _figure(key: str, png: bytes) -> str:
    b64 = base64.b64encode(png).decode()
    return (f"<figure><figcaption>{html.escape(TITLES[key])}</figcaption>"
            f"<img alt='{key}' src='data:image/png;base64,{b64}'></figure>")


def _html_verdict(results: dict) -> str:
    v = summary.verdict(results)
    parts = ["<section id='verdict'><h2>Verdict</h2>", f"<p class='lead'>{html.escape(v.lead)}</p>"]
    if v.table[1]:
        parts.append(_html_table(v.table))
    if v.points:
        parts += ["<ul>", *[f"<li>{html.escape(x)}</li>" for x in v.points], "</ul>"]
    return "".join(parts) + "</section>"


def render_html(results: dict, pngs: dict[str, bytes]) -> str:
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>merge_lab comparison report</title>",
             f"<style>{CSS}</style></head><body><h1>Comparison report</h1>", _html_verdict(results)]
    if results.get("notes"):
        parts += ["<ul>", *[f"<li>{html.escape(x)}</li>" for x in results["notes"]], "</ul>"]
    if text := summary.definition(results):
        parts.append(f"<h2>What the headline score is</h2><p class='note'>{html.escape(text)}</p>")
    parts += [_figure(k, pngs[k]) for k in LEAD_FIGURES if k in pngs]
    parts += ["<h2>Per suite</h2><ul>", *[f"<li>{html.escape(x)}</li>" for x in summary.suite_sentences(results)],
              "</ul>"]
    for title, fn, note, folded in SECTIONS:
        table = fn(results)
        if not table[1]:
            continue
        body = (f"<p class='note'>{html.escape(note)}</p>" if note else "") + _html_table(table)
        if folded:
            parts.append(f"<details><summary>{html.escape(title)}</summary>{body}</details>")
        else:
            parts.append(f"<h2>{html.escape(title)}</h2>{body}")
    rest = [k for k in pngs if k not in LEAD_FIGURES]
    if rest:
        parts += ["<h2>More figures</h2>", *[_figure(k, pngs[k]) for k in rest]]
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
