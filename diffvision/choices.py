"""Named choices (attention kinds, backends, presets, samplers, ...): one check, one error format.

Every setting that takes one of a fixed set of names goes through :func:`check_choice`, so a wrong
name always reads ``unknown <setting> <value> (did you mean <closest>?); accepted: [...]``.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable

__all__ = ["check_choice", "did_you_mean"]


def did_you_mean(name: Any, choices: Iterable[str]) -> str:
    """``" (did you mean 'DiT-S/2'?)"`` for the closest choices (case-insensitive), else ``""``."""
    choices = [str(c) for c in choices]
    by_folded = {c.casefold(): c for c in choices}
    close = difflib.get_close_matches(str(name).casefold(), list(by_folded), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(by_folded[c]) for c in close) + "?)"


def check_choice(setting: str, value: Any, accepted: Iterable[str]) -> str:
    """``value`` if it is one of ``accepted``, else a ``ValueError`` naming the setting, the value, the
    closest accepted names and all of them."""
    accepted = list(accepted)
    if isinstance(value, str) and value in accepted:
        return value
    raise ValueError(f"unknown {setting} {value!r}{did_you_mean(value, accepted)}; accepted: {accepted}")
