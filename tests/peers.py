"""Importing the interop peers (optimum, GPTQModel) in tests: skipped where they are not installed, but with CI=true
(set by .ci/run, which installs them through the `interop` extra) a missing peer is an error, so the interop tests
cannot silently stop running."""
import importlib
import os

import pytest


def require(name: str):
    """The imported module `name`; skips the calling test module without it, except under CI=true."""
    if os.environ.get("CI") == "true":
        return importlib.import_module(name)
    return pytest.importorskip(name)
