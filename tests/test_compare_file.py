"""Compare files load through core.config: every error names the file, the line and the key."""

from __future__ import annotations

import re

import pytest

from merge_lab.errors import MergeLabError
from merge_lab.evaluation.compare import run_compare
from merge_lab.evaluation.prepare import prepare


def write(tmp_path, text: str):
    f = tmp_path / "compare.yaml"
    f.write_text(text)
    return f


def test_a_misspelt_top_level_key_names_its_line_and_the_key_meant(tmp_path):
    f = write(tmp_path, "output: out\nsuites: [harmless_refusal]\ncandidats:\n  - {name: a, checkpoint: a}\n")
    with pytest.raises(MergeLabError) as e:
        run_compare(f, progress=False)
    msg = str(e.value)
    assert f"{f}, line 3 (candidats): unknown key 'candidats'. Did you mean 'candidates'?" in msg
    assert "missing required key 'candidates'" in msg
    assert not (tmp_path / "out").exists()


def test_a_bad_setting_value_names_its_line_and_key(tmp_path):
    f = write(tmp_path, "suites: [harmless_refusal]\nsettings:\n  seed: 1\n  limit: many\n"
                        "candidates: [{name: a, checkpoint: a}]\n")
    with pytest.raises(MergeLabError, match=re.escape(f"{f}, line 4 (settings.limit)")) as e:
        prepare(f)
    assert "valid integer" in str(e.value) and "'many'" in str(e.value)
    f = write(tmp_path, "suites: [harmless_refusal]\nsettings: {dtype: float8}\ncandidates: [{name: a, checkpoint: a}]\n")
    with pytest.raises(MergeLabError, match=r"line 2 \(settings\.dtype\).*'float32', 'bfloat16' or 'float16'"):
        prepare(f)
    f = write(tmp_path, "suites: [harmless_refusal]\nsettings: {limt: 3}\ncandidates: [{name: a, checkpoint: a}]\n")
    with pytest.raises(MergeLabError, match=r"line 2 \(settings\.limt\): unknown key 'limt'\. Did you mean 'limit'\?"):
        prepare(f)


def test_candidate_and_suite_entries_name_their_line(tmp_path):
    f = write(tmp_path, "suites: [harmless_refusal]\ncandidates:\n  - {name: a, checkpoint: a}\n"
                        "  - {name: b, checkpoint: b, recipe: r.yaml}\n")
    with pytest.raises(MergeLabError, match=r"line 4 \(candidates\.1\).*exactly one of checkpoint, recipe"):
        prepare(f)
    f = write(tmp_path, "candidates: [{name: a, checkpoint: a}]\nsuites:\n  - harmless_refusal\n"
                        "  - {name: helpful_likelihood, limt: 5}\n")
    with pytest.raises(MergeLabError, match=r"line 4 \(suites\.1\.limt\): unknown key 'limt'\. Did you mean 'limit'\?"):
        prepare(f)
    f = write(tmp_path, "candidates: [{name: a, checkpoint: a}]\nsuites:\n  - harmless_refusal\n  - harmless_refusl\n")
    with pytest.raises(MergeLabError, match=r"line 4 \(suites\.1\): unknown suite 'harmless_refusl'\. Did you mean"):
        prepare(f)
    f = write(tmp_path, "candidates: [{name: a, checkpoint: a}]\nsuites:\n  - {name: mine, path: x.jsonl}\n")
    with pytest.raises(MergeLabError, match=r"line 3 \(suites\.0\): the JSONL suite 'mine' needs 'kind'"):
        prepare(f)
    f = write(tmp_path, "suites: [harmless_refusal]\ncandidates: [{name: a, checkpoint: a}]\nheadline: z\n")
    with pytest.raises(MergeLabError, match=r"line 3 \(headline\): headline 'z' is not a candidate"):
        prepare(f)


def test_training_data_errors_name_their_line(tmp_path):
    f = write(tmp_path, "suites: [harmless_refusal]\ncandidates: [{name: a, checkpoint: a}]\n"
                        "training_data:\n  - advbench:train\n  - {url: x}\n")
    with pytest.raises(MergeLabError, match=r"line 5 \(training_data\.1\): training_data entry"):
        prepare(f)
