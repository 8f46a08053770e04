"""``python -m rmsprop_jax conformance`` runs every installed peer and prints the table."""

import subprocess
import sys

from rmsprop_jax.cli import conformance


def test_conformance_rows_for_every_peer():
    rows = conformance.run(configs=2, steps=3, seed=1)
    by_peer = {r["peer"]: r for r in rows}
    assert set(by_peer) == {"torch", "optax", "keras", "tf2", "tf1", "oneflow"}
    for peer in (
        "torch",
        "optax",
        "keras",
        "tf2",
        "tf1",
    ):  # installed by the test extra / spec numbers
        assert by_peer[peer]["verdict"] == "PASS", by_peer[peer]
        assert 0 <= by_peer[peer]["error"] <= conformance.TOLERANCE
    assert "not installed" in by_peer["oneflow"]["version"]
    table = conformance.format_table(rows)
    assert table.splitlines()[0].split()[:2] == ["peer", "version"]


def test_conformance_detects_a_wrong_preset(monkeypatch):
    """The check can fail: a preset with the wrong epsilon placement is flagged."""
    from rmsprop_jax import presets

    real = presets.torch

    def wrong(**kwargs):
        kwargs["eps"] = kwargs["eps"] * 10
        return real(**kwargs)

    monkeypatch.setattr(presets, "torch", wrong)
    rows = conformance.run(configs=2, steps=3, seed=1)
    assert next(r for r in rows if r["peer"] == "torch")["verdict"] == "FAIL"


def test_conformance_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "rmsprop_jax", "conformance", "--configs", "1", "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "torch" in out.stdout and "PASS" in out.stdout and "tolerance" in out.stdout
