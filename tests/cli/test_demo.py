"""Tests for the digits demo (``rmsprop_jax.cli.demo`` and ``python -m rmsprop_jax demo``)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from rmsprop_jax.cli import demo

REPO_ROOT = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# One line per epoch: "epoch  N  loss  X.XXXX  test acc  YY.YY%".
EPOCH_LINE = re.compile(
    r"^epoch +(\d+) +loss +\d+\.\d{4} +test acc +\d{1,3}\.\d{2}%$", re.MULTILINE
)


def _assert_png(path: Path) -> None:
    assert path.is_file(), f"no PNG at {path}"
    data = path.read_bytes()
    assert len(data) > len(PNG_MAGIC)
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG: {data[:8]!r}"


def _run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # Work whether or not the package is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "rmsprop_jax", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_train_defaults_reach_95_percent(tmp_path, capsys):
    out = tmp_path / "curve.png"
    result = demo.train(progress=False, output=out)

    losses, accs = result["train_loss"], result["test_accuracy"]
    assert len(losses) == len(accs) == demo.DEFAULT_EPOCHS
    assert all(math.isfinite(x) for x in losses)
    assert all(0.0 <= a <= 1.0 for a in accs)
    assert accs[-1] >= 0.95, f"final test accuracy {accs[-1]:.4f} < 0.95"
    # Loss goes down overall (per-epoch noise is allowed, the trend is not).
    assert losses[-1] < 0.25 * losses[0], losses
    assert min(losses[len(losses) // 2 :]) < min(losses[: len(losses) // 2]), losses

    assert Path(result["png"]) == out
    _assert_png(out)

    printed = capsys.readouterr().out
    epochs_printed = [int(n) for n in EPOCH_LINE.findall(printed)]
    assert epochs_printed == list(range(1, demo.DEFAULT_EPOCHS + 1)), printed
    assert f"loss curve written to {out}" in printed


def test_train_rejects_bad_arguments(tmp_path):
    out = tmp_path / "never.png"
    with pytest.raises(ValueError, match="epochs"):
        demo.train(epochs=0, output=out, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        demo.train(batch_size=0, output=out, progress=False)
    with pytest.raises(ValueError, match="learning_rate"):
        demo.train(learning_rate=-1.0, output=out, progress=False)
    assert not out.exists()


def test_missing_extra_names_the_install_command(monkeypatch):
    import importlib

    real_import = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("No module named 'tqdm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(demo.MissingDemoDependencyError, match=r"pip install 'rmsprop_jax\[demo\]'"):
        demo.train(epochs=1, progress=False)


def test_importing_the_package_does_not_need_demo_extras(tmp_path):
    code = (
        "import sys, rmsprop_jax, rmsprop_jax.cli.demo, rmsprop_jax.__main__\n"
        "loaded = [m for m in ('sklearn', 'matplotlib', 'tqdm') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr


def test_cli_help_and_short_run(tmp_path):
    help_proc = _run_cli("demo", "--help", cwd=tmp_path)
    assert help_proc.returncode == 0, help_proc.stderr
    for flag in (
        "--epochs",
        "--learning-rate",
        "--output",
        "--seed",
        "--batch-size",
        "--no-progress",
    ):
        assert flag in help_proc.stdout, f"{flag} missing from --help"

    out = tmp_path / "short.png"
    run_proc = _run_cli("demo", "--epochs", "2", "--output", str(out), cwd=tmp_path)
    assert run_proc.returncode == 0, run_proc.stderr
    assert "test acc" in run_proc.stdout
    assert [int(n) for n in EPOCH_LINE.findall(run_proc.stdout)] == [1, 2], run_proc.stdout
    assert str(out) in run_proc.stdout
    _assert_png(out)
    # The default output name was not used.
    assert not (tmp_path / demo.DEFAULT_OUTPUT).exists()
