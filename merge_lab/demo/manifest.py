"""The demo's manifest: which items each expert, the fusion and the same-training baselines trained on
and each suite evaluated.

Listed by source and index (OUT/manifest.json, copied beside the report), and checked disjoint
by id and by content, so the report's claim that no model was scored on its training data is
proved for the run at hand.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from merge_lab.demo.pipeline import Step


def write_manifest(root: Path, profile: str, base: Path, report: Path | None, steps: Sequence[Step]) -> Path:
    """Which items each expert trained on and each suite evaluated, by source and index; checked disjoint."""
    from merge_lab.datasets import sources as data

    experts = {}
    trained: list[str] = []
    for step in steps:
        f = root / step.out / "train_items.json"
        if step.kind == "align" and f.is_file():
            doc = json.loads(f.read_text())
            experts[doc.get("label") or Path(step.out).name] = {
                "recipe": f"merge_lab/demo/recipes/{step.recipe}", "as_run": str(root / "recipes" / step.recipe),
                "rows": doc["count"], "by_source": by_source(doc["ids"])}
            trained += doc["ids"]
    fusion_ids = fusion_items(root / "recipes" / "08_fuse_h3_moe.yaml")
    trained += fusion_ids
    suites, selection, baselines = {}, {}, {}
    results = report / "results.json" if report else None
    if results is not None and results.is_file():
        doc = json.loads(results.read_text())
        suites = suite_items(doc)
        baselines = baseline_items(doc, report)
        trained += [i for b in baselines.values() for i in b.pop("ids")]
        for sel in (doc.get("selection") or {}).values():
            for name, ids in sel.get("ids", {}).items():
                selection.setdefault(name, set()).update(ids)
    for s in [*suites.values(), *({"ids": sorted(v)} for v in selection.values())]:
        data.check_disjoint(trained, s["ids"])
    manifest = {
        "profile": profile,
        "base": str(base.resolve()),
        "note": "the experts are LoRA fine-tunes made here from this one base; experts and fusion train on the "
                "'train' split, suites evaluate the 'test' split, the fused model's top-k is chosen on the "
                "'validation' split (selection_items), and training items are checked disjoint from both by id and content",
        "experts": experts,
        "fusion_rows": {"note": "rows the router training drew from (train split)", "count": len(set(fusion_ids)),
                        "by_source": by_source(fusion_ids)},
        "baselines": baselines,
        "suites": {n: {"count": len(s["ids"]), "by_source": s["by_source"]} for n, s in suites.items()},
        "selection_items": {n: {"count": len(ids), "by_source": by_source(sorted(ids))} for n, ids in selection.items()},
        "disjoint_checked": bool(suites) and bool(trained),
    }
    path = root / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n")
    if report is not None and report.is_dir():
        shutil.copy2(path, report / "manifest.json")
    return path


def by_source(ids: list[str]) -> dict[str, list]:
    """{"advbench": [3, 17], ...}: sorted unique indices per source."""
    out: dict[str, set] = {}
    for i in ids:
        src, _, idx = str(i).rpartition(":")
        out.setdefault(src, set()).add(int(idx) if idx.isdigit() else idx)
    return {k: sorted(v, key=str) if any(isinstance(x, str) for x in v) else sorted(v) for k, v in out.items()}


def fusion_items(recipe: Path) -> list[str]:
    """Ids of the rows a fuse recipe's train.data selects: the rows `fuse` trains on, read the same way."""
    from merge_lab.merge.recipe import load_recipe
    from merge_lab.moe.train_config import train_rows

    if not recipe.is_file():
        return []
    fuse_recipe = load_recipe(recipe)
    if not isinstance((fuse_recipe.train or {}).get("data"), list):
        return []
    return [r.id for r in train_rows(fuse_recipe)]


def baseline_items(results: dict, report: Path) -> dict[str, dict]:
    """Per same-training baseline the comparison trained (multitask, merge_then_train), the items it
    trained on: the train_items.json in its cache folder (named by its fingerprint)."""
    out = {}
    for name, c in (results.get("candidates") or {}).items():
        if not c.get("training"):
            continue
        f = report / "cache" / "trained" / f"{name}-{c['fingerprint']}" / "train_items.json"
        if f.is_file():
            ids = json.loads(f.read_text())["ids"]
            out[name] = {"kind": c["kind"], "rows": len(set(ids)), "by_source": by_source(ids), "ids": ids}
    return out


def suite_items(results: dict) -> dict[str, dict]:
    """Per suite, the ids it evaluated, from the comparison's results.json."""
    out = {}
    per_example = results.get("per_example") or {}
    for name in results.get("suites") or {}:
        records = next(iter((per_example.get(name) or {}).values()), [])
        ids = [str(r["id"]) for r in records]
        out[name] = {"ids": ids, "by_source": by_source(ids)}
    return out
