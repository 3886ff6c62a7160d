"""tests/peers.py: a missing interop peer skips locally but fails under CI=true."""
import pytest
from peers import require


def test_missing_peer_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require("no_such_interop_peer")


def test_missing_peer_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError):
        require("no_such_interop_peer")


def test_installed_peer_is_returned(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert require("json").dumps([1]) == "[1]"
