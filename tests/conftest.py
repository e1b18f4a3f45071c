import sys

import pytest


@pytest.fixture(autouse=True)
def _cli_argv(monkeypatch):
    """The diffvision CLI parses only the arguments a test gives it, never pytest's own argv."""
    monkeypatch.setattr(sys, "argv", ["diffvision"])
