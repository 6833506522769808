"""`lm_eval:TASK`: an lm-eval-harness task run on a candidate through lm-eval's model interface."""

from __future__ import annotations

import hashlib

from merge_lab.datasets.sources import Example
from merge_lab.errors import MergeLabError
from merge_lab.evaluation.interface import Candidate
from merge_lab.evaluation.suites.base import EvalContext, Suite


class LmEvalSuite(Suite):
    """Runs an `lm-eval` task on a candidate (needs `pip install lm-eval` and its data online).
    Per-example scores are the task's first metric on each logged sample."""

    objective = "capability"
    metric = "lm-eval metric"

    def __init__(self, task: str, **kw):
        self.name = f"lm_eval:{task}"  # type: ignore[misc]
        self.task = task
        super().__init__(**kw)
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise MergeLabError(
                f"suite '{self.name}' needs lm-eval: `pip install lm-eval` (its tasks also download data, "
                "so run it online)."
            ) from None

    def items(self) -> list[Example]:
        return []

    def fingerprint(self, ctx: EvalContext) -> str:
        return hashlib.sha256(f"lm_eval\x00{self.task}\x00{self.limit}".encode()).hexdigest()[:16]

    def evaluate(self, candidate: Candidate, ctx: EvalContext) -> list[dict]:
        from lm_eval import simple_evaluate
        from lm_eval.api.model import LM

        class Adapter(LM):
            """lm-eval's model interface over a merge_lab candidate (prompts used verbatim)."""

            def loglikelihood(self, requests):
                return [(s, g) for s, _, g in candidate.loglikelihood_full([tuple(r.args[:2]) for r in requests])]

            def loglikelihood_rolling(self, requests):
                return [s for s, _ in candidate.loglikelihood([("", r.args[0]) for r in requests])]

            def generate_until(self, requests):
                out = []
                for r in requests:
                    context, gen_kwargs = r.args[0], (r.args[1] if len(r.args) > 1 else {})
                    until = gen_kwargs.get("until") or []
                    out += candidate.generate([context], formatted=True, stop=[until] if isinstance(until, str) else until)
                return out

        res = simple_evaluate(model=Adapter(), tasks=[self.task], limit=self.limit, log_samples=True,
                              random_seed=self.seed, numpy_random_seed=self.seed, torch_random_seed=self.seed)
        if not res or self.task not in res.get("samples", {}):
            raise MergeLabError(f"lm-eval returned no samples for task '{self.task}'; is the task name right?")
        out = []
        for i, s in enumerate(res["samples"][self.task]):
            names = list(s.get("metrics") or []) + [k for k in ("acc", "exact_match", "acc_norm") if k in s]
            value = next((float(s[k]) for k in names if isinstance(s.get(k), (int, float, bool))), float("nan"))
            out.append({"id": f"{self.task}:{s.get('doc_id', i)}", "score": value})
        return out
