"""Evaluation: candidates behind one interface, suites, metrics with uncertainty, cost, compare."""
