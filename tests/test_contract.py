"""Every registered strategy passes the public contract suite, on every tiny architecture."""

import pytest

from merge_lab.merge import interface as registry
from merge_lab.testing import ARCHITECTURES, check_strategy

TENSORWISE = [n for n, cls in registry.available().items() if not cls.structural]


@pytest.mark.parametrize("name", TENSORWISE)
def test_contract_llama(name, tmp_path):
    check_strategy(name, tmp_path, "llama")


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a != "llama"])
@pytest.mark.parametrize("name", ["linear", "ties"])
def test_contract_other_architectures(name, arch, tmp_path):
    check_strategy(name, tmp_path, arch)


def test_builtins_are_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group=registry.ENTRY_POINT_GROUP)}
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp"} <= names
