"""`harness regress`: regression checks against a baseline (harness.reports.regress)."""

from harness.reports.regress import add_parser  # noqa: F401
