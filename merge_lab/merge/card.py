"""The model card (README.md) written beside every output: recipe, inputs and their hashes,
library versions and seed, so a merge can be traced and repeated."""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version

import yaml

from merge_lab.merge.plan import Plan

LIBRARIES = ("merge-lab", "torch", "safetensors", "transformers", "peft")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return out


def recipe_text(plan: Plan) -> str:
    return yaml.safe_dump(plan.recipe.model_dump(exclude_defaults=True), sort_keys=False)


def recipe_hash(plan: Plan) -> str:
    return hashlib.sha256(recipe_text(plan).encode()).hexdigest()


def model_card(
    plan: Plan, hashes: dict[str, dict[str, str]] | None, non_finite: dict[tuple[str, str], int] | None = None
) -> str:
    """The card; `non_finite`: (input folder, tensor) -> NaN / Inf values merged (allow_non_finite)."""
    recipe = plan.recipe
    front = {
        "library_name": "transformers",
        "tags": ["merge", "merge-lab", plan.strategy],
    }
    if recipe.base_model:
        front["base_model"] = recipe.base_model
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines.append(f"# {recipe.name or 'Merged model'}")
    lines.append("")
    lines.append(f"Made with merge_lab using the `{plan.strategy}` strategy (seed {recipe.seed}).")
    lines.append("")
    lines.append("## Inputs")
    lines.append("")
    for ckpt in plan.inputs:
        lines.append(f"- `{ckpt.path}`")
        for name, digest in (hashes or {}).get(str(ckpt.path), {}).items():
            lines.append(f"  - `{name}` sha256 `{digest}`")
    lines += ["", "## Recipe", "", "```yaml", recipe_text(plan).strip(), "```", ""]
    lines += ["## Versions", "", "```json", json.dumps(library_versions(), indent=2), "```", ""]
    if plan.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in plan.notes] + [""]
    if non_finite:
        lines += non_finite_section(non_finite)
    return "\n".join(lines)


def non_finite_section(non_finite: dict[tuple[str, str], int]) -> list[str]:
    total = sum(non_finite.values())
    lines = [
        "## Non-finite input values",
        "",
        f"The inputs held {total} NaN / Inf value(s) in {len(non_finite)} tensor(s), merged as they were "
        "(`allow_non_finite`); the output tensors made from them may hold NaN / Inf too.",
        "",
    ]
    lines += [f"- `{folder}`: `{tensor}`: {n} value(s)" for (folder, tensor), n in sorted(non_finite.items())]
    return [*lines, ""]
