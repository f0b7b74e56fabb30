"""Prompt files of the bundled suites (data only)."""
