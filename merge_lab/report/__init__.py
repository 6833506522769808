"""The comparison report: tables, matplotlib plots, and Markdown / self-contained HTML rendering."""

from merge_lab.report.render import write_report

__all__ = ["write_report"]
