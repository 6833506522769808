"""The report's figures (matplotlib, Agg): each function returns PNG bytes, or None when the
figure has nothing to show (e.g. no MoE candidate for the routing plot)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


def suite_bars(results: dict) -> bytes:
    """One panel per suite: each candidate's metric with its 95% bootstrap interval; the oracle dashed."""
    suites = list(results["suites"])
    names = list(results["candidates"])
    cols = min(3, len(suites))
    rows = math.ceil(len(suites) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, s in zip(axes.flat, suites):
        res = results["results"][s]
        vals = [res[n]["value"] for n in names]
        err = [[res[n]["value"] - res[n]["ci"][0] for n in names], [res[n]["ci"][1] - res[n]["value"] for n in names]]
        ax.bar(range(len(names)), vals, yerr=err, capsize=3, color=[COLORS[i % len(COLORS)] for i in range(len(names))])
        ax.axhline(results["oracle"][s]["value"], ls="--", color="gray", lw=1, label="oracle")
        info = results["suites"][s]
        arrow = "↑" if info["higher_is_better"] else "↓"
        ax.set_title(f"{s}\n{info['metric']} {arrow} (n={info['n']})", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(suites):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _png(fig)


def radar(results: dict) -> bytes | None:
    """Objectives (mean min-max-normalised score of their suites; 1 = best candidate) per candidate:
    relative to the file's candidates, unlike the headline score."""
    objs = list(results["objectives"])
    if not objs:
        return None
    names = list(results["candidates"])
    import numpy as np

    angles = np.linspace(0, 2 * np.pi, max(len(objs), 3), endpoint=False).tolist()
    fig = plt.figure(figsize=(5, 5))
    ax = fig.add_subplot(111, polar=True)
    labels = objs + [""] * (len(angles) - len(objs))
    for i, n in enumerate(names):
        v = [results["objectives"][o][n] for o in objs] + [0.0] * (len(angles) - len(objs))
        ax.plot(angles + angles[:1], v + v[:1], color=COLORS[i % len(COLORS)], lw=1.5, label=n)
        ax.fill(angles + angles[:1], v + v[:1], color=COLORS[i % len(COLORS)], alpha=0.08)
    ax.set_xticks(angles, labels)
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper right", bbox_to_anchor=(1.35, 1.1), fontsize=8)
    ax.set_title("objectives, relative (1 = best candidate in this file on that objective)", fontsize=9)
    return _png(fig)


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names not dominated: no other point has lower-or-equal cost and higher-or-equal quality
    with one strictly better."""
    front = []
    for n, (c, q) in points.items():
        if not any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for m, (c2, q2) in points.items() if m != n):
            front.append(n)
    return front


def quality_cost(results: dict) -> bytes:
    """Quality (the reference-anchored headline score; the relative min-max mean when there is
    none) against active parameters per token."""
    cands = results["candidates"]
    anchored = all(c.get("quality") is not None for c in cands.values())
    key = "quality" if anchored else "quality_relative"
    names = list(cands)
    pts = {n: (cands[n]["cost"]["params_active"], cands[n][key]) for n in names}
    front = set(pareto_front(pts))
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, n in enumerate(names):
        c, q = pts[n]
        ax.scatter([c], [q], s=60, color=COLORS[i % len(COLORS)], edgecolor="black" if n in front else "none", lw=1.5, zorder=3)
        ax.annotate(n, (c, q), textcoords="offset points", xytext=(5, 4), fontsize=8)
    fr = sorted(pts[n] for n in front)
    ax.plot([p[0] for p in fr], [p[1] for p in fr], "k--", lw=1, label="Pareto front")
    ax.set_xlabel("active parameters per token")
    hs = results.get("headline_scores", {})
    if anchored and hs.get("scale") == "source":
        ax.set_ylabel(f"headline score ({hs['base']} = 0, best source = 1)")
        ax.axhline(0, color="gray", lw=0.8, ls=":")
        ax.axhline(1, color="gray", lw=0.8, ls=":")
    elif anchored:
        ax.set_ylabel(f"headline score (base {hs.get('base')} standard deviations)")
    else:
        ax.set_ylabel("quality (relative: min-max across candidates)")
        ax.set_ylim(-0.05, 1.1)
    ax.legend(fontsize=8)
    ax.set_title("headline score against cost" if anchored else "quality against cost", fontsize=9)
    return _png(fig)


def routing(results: dict) -> bytes | None:
    """For each MoE candidate: share of routing slots per expert, averaged over layers, per suite."""
    moes = {n: c["routing"] for n, c in results["candidates"].items() if c.get("routing")}
    if not moes:
        return None
    fig, axes = plt.subplots(1, len(moes), figsize=(5 * len(moes), 3.2), squeeze=False)
    for ax, (n, per_suite) in zip(axes.flat, moes.items()):
        suites = list(per_suite)
        n_exp = len(next(iter(per_suite.values()))[0])
        bottom = [0.0] * len(suites)
        for e in range(n_exp):
            share = [sum(layer[e] for layer in per_suite[s]) / len(per_suite[s]) for s in suites]
            ax.bar(range(len(suites)), share, bottom=bottom, label=f"expert {e}", color=COLORS[e % len(COLORS)])
            bottom = [b + v for b, v in zip(bottom, share)]
        ax.set_xticks(range(len(suites)), suites, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("share of routing slots")
        ax.set_title(f"routing use: {n}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def all_plots(results: dict) -> dict[str, bytes]:
    """name -> PNG for every figure that has something to show."""
    out = {"suites": suite_bars(results), "objectives": radar(results), "quality_cost": quality_cost(results),
           "routing": routing(results)}
    return {k: v for k, v in out.items() if v}
