"""`harness leaderboard`: rank the methods (harness.reports.leaderboard)."""

from harness.reports.leaderboard import add_parser  # noqa: F401
