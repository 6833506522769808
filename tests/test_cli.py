"""The command line as a user runs it: help, strategies, validate, plan, merge, and a plugin."""

from __future__ import annotations

import subprocess
import sys

import torch
from typer.testing import CliRunner

from merge_lab.cli import app
from merge_lab.testing import load_tensors, write_recipe

runner = CliRunner()


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "merge_lab", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    for command in ("merge", "validate", "plan", "strategies"):
        assert command in result.stdout


def test_strategies_lists_builtins_and_plugin_with_parameters():
    result = runner.invoke(app, ["strategies"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "median"):
        assert name in result.output
    assert "density" in result.output and "lambda" in result.output and "per model" in result.output


def test_validate_and_plan(family, tmp_path):
    base, models = family
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "ties", "base_model": str(base),
                                                "models": [str(m) for m in models]})
    result = runner.invoke(app, ["validate", str(recipe)])
    assert result.exit_code == 0 and "ok" in result.output and "output tensors" in result.output
    result = runner.invoke(app, ["plan", str(recipe), "-o", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "predicted peak working memory" in result.output and "enough" in result.output
    assert not (tmp_path / "out").exists()


def test_merge_prints_summary(family, tmp_path):
    base, models = family
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear", "models": [str(m) for m in models]})
    result = runner.invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "out")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "merge complete" in result.output and "tensors" in result.output


def test_plugin_from_separate_package_used_through_cli(family, tmp_path):
    """`median` comes from tests/plugin_pkg, installed as its own distribution with an entry point."""
    from importlib.metadata import distribution

    assert distribution("merge-lab-plugin-example").entry_points  # a separately installed package
    base, models = family
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "median", "models": [str(m) for m in models]})
    result = subprocess.run(
        [sys.executable, "-m", "merge_lab", "merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    out = load_tensors(tmp_path / "out")
    ins = [load_tensors(m) for m in models]
    name = "model.layers.0.mlp.up_proj.weight"
    expected = torch.stack([t[name].float() for t in ins]).median(dim=0).values
    torch.testing.assert_close(out[name].float(), expected.to(torch.bfloat16).float())
