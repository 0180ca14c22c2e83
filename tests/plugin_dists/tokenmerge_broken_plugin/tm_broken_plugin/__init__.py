"""Broken tokenmerge plugins (see pyproject.toml)."""
