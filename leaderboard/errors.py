"""Errors of the leaderboard package: each message names the file or field and what was expected."""

from __future__ import annotations


class LeaderboardError(ValueError):
    """Bad input (published data, result files, arguments); the CLI prints the message, no traceback."""


class PublishedDataError(LeaderboardError):
    """A published-data CSV that does not parse: the message names the file, row and column."""


class ResultsNotFoundError(LeaderboardError, FileNotFoundError):
    """A results path that does not exist, or a build with nothing to show."""
