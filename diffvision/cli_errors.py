"""Errors of the ``diffvision`` command as one short message.

Parser errors (a mistyped key, a bad value) print ``error: <message>`` with a "did you mean" for an
unknown key, instead of the 80-line usage and jsonargparse's dump of the Union it tried; errors while
the run starts (an unknown model name, a missing dataset) print the error that was raised, unwrapped
from jsonargparse, without the traceback. ``DIFFVISION_DEBUG=1`` brings back the usage and the traceback.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
import traceback
from typing import NoReturn, Optional

import jsonargparse
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["DEBUG_ENV", "DiffvisionArgumentParser", "debug_requested", "report_error", "user_error"]

DEBUG_ENV = "DIFFVISION_DEBUG"
_JSONARGPARSE_DIR = os.path.dirname(jsonargparse.__file__)


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _options(parser: ArgumentParser) -> list[str]:
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


def _init_parameters(class_path: str) -> list[str]:
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return [p for p in inspect.signature(cls).parameters if p not in ("args", "kwargs")]
    except (ImportError, AttributeError, TypeError, ValueError):
        return []


def _suggestion(message: str, parser: ArgumentParser) -> str:
    """``; did you mean --x?`` for the unknown key that ``message`` names, or ''."""
    nested = re.search(r"Parser key \"([\w.]+)\".*?class_path '([\w.]+)'.*?Option '([\w.]+)' is not accepted",
                       message, re.S)
    if nested:  # a class's init argument (--model.init_args.<name>)
        group, class_path, key = nested.groups()
        prefix = f"--{group}.init_args."
        candidates = [prefix + name for name in _init_parameters(class_path)]
        key = prefix + key
    else:
        found = (re.search(r"unrecognized arguments: (\S+)", message)
                 or re.search(r"does not accept option '([^']+)'", message)
                 or re.search(r"Option '([^']+)' is not accepted", message))
        if not found:
            return ""
        key = "--" + found.group(1).lstrip("-").split("=", 1)[0]
        candidates = _options(parser)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _brief(message: str) -> str:
    """jsonargparse's Union dump cut to the error of the subtype that was meant (the first listed)."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message.strip()
    head = message.split("\n", 1)[0].strip()
    errors = re.search(r"Errors:\n\s*- (.*?)(?:\n\s*- |\n\s*Given value)", message, re.S)
    detail = " ".join(line.strip() for line in errors.group(1).splitlines()) if errors else ""
    given = re.search(r"\n\s*Given value: (.*)$", message.strip())
    if given and "Got value" not in detail and not given.group(1).startswith("NestedArg("):
        detail += f" (given: {given.group(1)})"
    head = "" if head.startswith("Does not validate") else head + " "
    return (head + detail).strip() or message.strip()


class DiffvisionArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` whose errors are one message: ``error: <what>; did you mean <key>?``
    and where to find the options (jsonargparse's usage and full message with ``DIFFVISION_DEBUG=1``)."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error or debug_requested():  # jsonargparse's inner parsers raise; debug: everything
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {_brief(message)}{_suggestion(message, parser)}\n"
                         f"(options: {prog} --help; {DEBUG_ENV}=1 shows the full parser message)\n")
        self.exit(2)


def _raised_by_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(_JSONARGPARSE_DIR)


def user_error(err: BaseException) -> BaseException:
    """The error to report: jsonargparse re-raises a class's own error (an unknown ``model_name``, with its
    "did you mean") inside a dump of everything it tried; the class's error is the one that matters."""
    while err.__cause__ is not None and _raised_by_jsonargparse(err):
        err = err.__cause__
    return err


def report_error(err: BaseException, file=None) -> None:
    """``error: <message>`` for ``err`` (its type too, unless it is an expected kind of bad input)."""
    err = user_error(err)
    expected = isinstance(err, (ValueError, TypeError, OSError, KeyError))
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    message = text if expected and text else f"{type(err).__name__}: {text}"
    (file or sys.stderr).write(f"error: {message}\n({DEBUG_ENV}=1 shows the traceback)\n")
