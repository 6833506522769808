"""The report's tables as (header, rows) of strings, rendered to Markdown and HTML alike."""

from __future__ import annotations

Table = tuple[list[str], list[list[str]]]


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None or v != v:
        return "–"
    return f"{v:.{digits}f}"


def _ci(e: dict) -> str:
    return f"{fmt(e['value'])} [{fmt(e['ci'][0])}, {fmt(e['ci'][1])}]"


def _si(n: float | None, unit: str = "") -> str:
    if n is None:
        return "–"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}{unit}"
    return f"{n:.0f} {unit}".strip()


def quality(results: dict) -> Table:
    """Suite x candidate: mean [95% bootstrap CI], with the oracle as an upper bound."""
    names = list(results["candidates"])
    header = ["suite", "metric", "n", *names, "oracle (upper bound)"]
    rows = []
    for s, info in results["suites"].items():
        arrow = "↑" if info["higher_is_better"] else "↓"
        best = results["best"][s]["candidate"]
        cells = [("**" + _ci(results["results"][s][n]) + "**") if n == best else _ci(results["results"][s][n]) for n in names]
        label = f"{s} (OOD)" if info.get("ood") else s  # out of distribution: the headline's suites
        rows.append([label, f"{info['metric']} {arrow}", str(info["n"]), *cells, _ci(results["oracle"][s])])
    return header, rows


def best(results: dict) -> Table:
    """Each suite's best against its runner-up; Holm over the suites."""
    header = ["suite", "best", "runner-up", "gap [95% CI]", "p (paired)", "p (Holm)", "verdict", "n"]
    rows = []
    for s, b in results["best"].items():
        if "runner_up" not in b:
            rows.append([s, b["candidate"], "–", "–", "–", "–", "–", "–"])
            continue
        rows.append([s, b["candidate"], b["runner_up"], f"{fmt(b['diff'])} [{fmt(b['ci'][0])}, {fmt(b['ci'][1])}]",
                     fmt(b["p"], 4), fmt(b.get("p_holm"), 4), b.get("verdict", "–"), str(b["n"])])
    return header, rows


def headline_scores(results: dict) -> Table:
    """Candidate x objective on the reference-anchored headline scale, and the overall score."""
    hs = results.get("headline_scores", {})
    if "overall" not in hs:
        return [], []
    objs = list(hs["per_objective"])
    header = ["candidate", *objs, "headline (" + ", ".join(hs["objectives"]) + ")"]
    top = max(hs["overall"].values())
    rows = [[n, *[fmt(hs["per_objective"][o].get(n), 2) for o in objs],
             f"**{fmt(v, 2)}**" if v == top else fmt(v, 2)] for n, v in hs["overall"].items()]
    return header, rows


def groups(results: dict) -> Table:
    """Candidates listed by `group:` (sources first, ungrouped last) with their headline score: e.g. the
    fused model's ablations side by side. Empty when no candidate has a group."""
    cands = results["candidates"]
    if not any(c.get("group") for c in cands.values()):
        return [], []
    overall = results.get("headline_scores", {}).get("overall", {})

    def group_of(n: str) -> str:
        return cands[n].get("group") or ("source" if cands[n].get("source") else "–")

    order = list(dict.fromkeys(["source", *(group_of(n) for n in cands)]))
    header = ["group", "candidate", "kind", "headline score"]
    rows = [[g, n, cands[n]["kind"], fmt(overall.get(n), 2)] for g in order for n in cands if group_of(n) == g]
    return header, rows


def training(results: dict) -> Table:
    """The same-training baselines' budget, as worked out from the recipes: what each one got and what
    the sources it is measured against spent."""
    header = ["candidate", "trained from", "rows", "steps x rows per step", "LoRA", "trainable params",
              "sources' trainable params", "lr", "sources (steps x rows per step, rows)"]
    rows = []
    for n, c in results["candidates"].items():
        t = c.get("training")
        if not t:
            continue
        sources = "; ".join(f"{s['recipe'].rsplit('/', 1)[-1]}: {s['steps']} x {s['batch_size']}, {s['rows']} rows, "
                            f"{s['what']}" for s in t["sources"])
        lora = f"r{t['lora_r']} (alpha {t['lora_alpha']:g}) on {', '.join(t['target_modules'])} in {t['layers']} layers"
        rows.append([n, c.get("merge") or str(t["base"]).rsplit("/", 1)[-1], str(t["rows"]),
                     f"{t['steps']} x {t['batch_size']}", lora, _si(t["trainable_params"]), _si(t["budget_params"]),
                     f"{t['lr']:g}", sources])
    return header, rows


def headline_suites(results: dict) -> Table:
    """The headline candidate against each comparator on each suite, in the suite's own units."""
    per = (results.get("headline") or {}).get("per_suite", [])
    header = ["suite", "against", "difference [95% CI]", "p", "p (Holm)", "verdict", "n"]
    rows = [[c["suite"], c["against"], f"{fmt(c['diff'])} [{fmt(c['ci'][0])}, {fmt(c['ci'][1])}]", fmt(c["p"], 4),
             fmt(c["p_holm"], 4), c["verdict"], str(c["n"])] for c in per]
    return header, rows


def paired(results: dict) -> Table:
    """Each candidate minus the best single source model on that suite (paired over items)."""
    header = ["suite", "best source", "candidate", "difference [95% CI]", "p", "p (Holm)", "verdict", "n"]
    rows = []
    for s, p in results["paired"].items():
        ref = p["reference"]
        for n, t in p["candidates"].items():
            rows.append([s, ref, n, f"{fmt(t['diff'])} [{fmt(t['ci'][0])}, {fmt(t['ci'][1])}]", fmt(t["p"], 4),
                         fmt(t.get("p_holm"), 4), t.get("verdict", "–"), str(t["n"])])
    return header, rows


def cost(results: dict) -> Table:
    header = ["candidate", "kind", "params total", "params active / token", "scoring tok/s", "generation tok/s",
              "peak memory", "from cache"]
    rows = []
    for n, c in results["candidates"].items():
        k = c["cost"]
        rows.append([n, c["kind"] + (" (source)" if c.get("source") else ""), _si(k["params_total"]), _si(k["params_active"]),
                     fmt(k["score_tokens_per_s"], 1), fmt(k["gen_tokens_per_s"], 1), _si(k["peak_memory_bytes"], "B"),
                     "yes" if c.get("cached") else "no"])
    return header, rows


def objectives(results: dict) -> Table:
    names = list(results["candidates"])
    header = ["objective", *names]
    rows = [[o, *[fmt(v[n], 2) for n in names]] for o, v in results["objectives"].items()]  # relative: min-max
    return header, rows


def suites(results: dict) -> Table:
    header = ["suite", "objective", "distribution", "split", "n", "description"]
    rows = [[s, i["objective"], "out (held-out sources)" if i.get("ood") else "in (held-out items)", i["split"],
             str(i["n"]), i["description"]] for s, i in results["suites"].items()]
    return header, rows


def answers(results: dict, per_suite: int = 3, width: int = 160) -> Table:
    """A few greedy answers per generation suite, side by side: lets a reader check the refusal
    classifier and the judge instead of trusting them."""
    names = list(results["candidates"])
    header = ["suite", "item", *names]
    rows = []
    for s, per in results["per_example"].items():
        first = per[names[0]]
        if not first or "answer" not in first[0]:
            continue
        for i in range(min(per_suite, len(first))):
            cells = []
            for n in names:
                r = per[n][i]
                a = " ".join(str(r.get("answer", "")).split())
                a = a if len(a) <= width else a[: width - 1] + "…"
                cells.append(f"{a} ({r['score']:g})")
            rows.append([s, first[i]["id"], *cells])
    return header, rows
