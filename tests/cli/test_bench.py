"""``python -m rmsprop_jax bench`` runs and its JSON has every row (no timed assertions)."""

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys
import time

import pytest

from rmsprop_jax.cli import bench

REPO = pathlib.Path(__file__).resolve().parents[2]
CONTENDERS = ("floor", "floor-per-leaf", "rj", "rj-bf16", "rj-int8", "optax", "keras", "torch")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "rows.json"
    env = dict(os.environ, KERAS_BACKEND="jax", PYTHONPATH=str(REPO))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "rmsprop_jax",
            "bench",
            "--quick",
            "--cases",
            "100K/200",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout, json.loads(path.read_text())


def test_bench_rows_for_every_contender_and_config(quick_run):
    stdout, data = quick_run
    rows = data["rows"]
    assert {r["case"] for r in rows} == {"100K/200"}
    for config in bench.CONFIGS:
        by_name = {r["contender"]: r for r in rows if r["config"] == config}
        for name in CONTENDERS:
            row = by_name[name]
            assert row["status"] == "ok", row
            assert row["median_ms"] > 0 and math.isfinite(row["median_ms"])
            assert row["ratio"] > 0 and math.isfinite(row["ratio"]), row
            assert len(row["times_ms"]) == 3  # --quick: 3 interleaved repeats
        assert by_name["floor"]["ratio"] == 1.0
        for name in ("floor", "rj", "optax", "keras"):  # the JAX contenders: compiled HLO stats
            row = by_name[name]
            assert isinstance(row["fusions"], int) and row["fusions"] >= 1, row
            assert isinstance(row["passes"], int) and 1 <= row["passes"] <= row["fusions"]
            assert row["bytes_accessed"] > 0
            assert row["peak_bytes"] > 0 and row["temp_bytes"] >= 0
        assert "fusions" not in by_name["torch"]
        assert "rj-contiguous" in by_name  # a row either way: measured, or n/a until it exists
        assert by_name["floor"]["floor_bytes_per_param"] == bench.FLOOR_BYTES[config][0]
    assert data["environment"]["cpu_count"] >= 1 and data["environment"]["devices"]
    assert data["environment"]["complete"] is True
    assert "x floor" in stdout and "fusions" in stdout and "jax" in stdout


def test_progress_from_the_first_second_and_the_whole_commands_time(quick_run):
    """A line before the peers' imports (seconds of silence otherwise); the summary gives the
    whole command's time, which contains the benchmark's clock and the imports before it."""
    stdout, data = quick_run
    assert stdout.splitlines()[0].startswith("loading the peers")
    env = data["environment"]
    assert env["total_seconds"] > 0
    assert env["total_seconds"] < env["process_seconds"] < env["total_seconds"] + 120
    assert f"the whole command: {env['process_seconds']:.1f} s" in stdout


def test_state_bytes_and_per_leaf_floor(quick_run):
    """State bytes per parameter come from the state's arrays; the per-leaf floor compiles to the
    floor's kernels once per leaf, and rj to no more than that."""
    rows = quick_run[1]["rows"]
    per_slot = {"plain": 1, "centered+momentum": 3, "full": 4}  # v; v, a, m; v, a, m, ema
    for config, slots in per_slot.items():
        by_name = {r["contender"]: r for r in rows if r["config"] == config}
        assert by_name["rj"]["state_bytes_per_param"] == pytest.approx(4.0 * slots)
        assert by_name["rj-bf16"]["state_bytes_per_param"] == pytest.approx(
            2.0 * slots + 2.0 * (config == "full")  # the weight EMA keeps the params' float32
        )
        # --quick leaves have 31 elements: under 4096, so int8 keeps float32 state (as bnb)
        assert by_name["rj-int8"]["state_bytes_per_param"] == pytest.approx(4.0 * slots)
        leaves = by_name["rj"]["leaves"]
        assert by_name["floor-per-leaf"]["passes"] == leaves * by_name["floor"]["passes"] or (
            config == "full"  # global norm: one reduction per leaf plus the sum
        )
        assert by_name["rj"]["passes"] <= by_name["floor-per-leaf"]["passes"]
        # No copies: the step reads v as stored (the global norm concatenates tiny leaves).
        assert "copy" not in by_name["rj-bf16"]["other_op_kinds"]
        for name in ("rj", "rj-bf16"):
            assert set(by_name[name]["other_op_kinds"]) <= {"concatenate"}, by_name[name]
        if config != "full":
            assert by_name["rj"]["other_ops"] == by_name["rj-bf16"]["other_ops"] == 0


def test_json_keeps_the_cases_done_when_a_run_is_stopped(tmp_path, monkeypatch):
    """``--json`` is rewritten after each case, so a run stopped by a time limit keeps its rows."""
    path = tmp_path / "rows.json"
    done = [{"case": "16M/1", "config": "plain", "contender": "rj", "median_ms": 9.0}]

    def stopped_after_one_case(*args, on_case=None, **kwargs):
        on_case({"cpu_count": 2}, done)
        raise KeyboardInterrupt  # as `timeout` stopping the process

    monkeypatch.setattr(bench, "run", stopped_after_one_case)
    args = argparse.Namespace(cases=None, quick=False, repeats=None, target_ms=None, seed=0)
    args.torch_threads, args.json = None, str(path)
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    data = json.loads(path.read_text())
    assert data == {"environment": {"cpu_count": 2, "complete": False}, "rows": done}
    assert [f.name for f in tmp_path.iterdir()] == ["rows.json"]  # written aside, then renamed


def test_floor_fuses_to_the_minimum_on_one_buffer(quick_run):
    """The floor's own HLO: one loop per state array written, plus one norm pass for full."""
    rows = [r for r in quick_run[1]["rows"] if r["contender"] == "floor"]
    passes = {r["config"]: r["passes"] for r in rows}
    assert passes["plain"] <= 2 and passes["centered+momentum"] <= 4 and passes["full"] <= 6


def test_hlo_summary_counts_fusions_passes_and_other_ops():
    text = """HloModule m
%fused_computation (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %n = f32[8]{0} negate(%p0)
}
ENTRY %main (a: f32[8], s: f32[]) -> (f32[8], f32[], f32[8]) {
  %a = f32[8]{0} parameter(0)
  %s = f32[] parameter(1)
  %neg_fusion = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_computation
  %reduce_fusion = f32[] fusion(%a), kind=kInput, calls=%fused_computation
  %scalar_fusion = f32[] fusion(%s), kind=kLoop, calls=%fused_computation
  %copy.1 = f32[8]{0} copy(%neg_fusion)
  ROOT %t = (f32[8]{0}, f32[], f32[8]{0}) tuple(%neg_fusion, %reduce_fusion, %copy.1)
}
"""
    summary = bench.hlo_summary(text)
    assert summary["fusions"] == 3
    assert summary["passes"] == 2  # the scalar-only fusion is no pass over memory
    assert summary["other_ops"] == 1 and summary["other_op_kinds"] == {"copy": 1}
    assert summary["other_op_max_elements"] == 8


def test_case_filter():
    assert bench._parse_filter("16M/1,100k/200,full") == ({"16M/1", "100K/200"}, {"full"})
    assert bench._parse_filter(None) == (set(), set())
    with pytest.raises(SystemExit):
        bench._parse_filter("17M/3")
    assert bench.case_sizes("16M/160", quick=False) == (16_000_000, 160, 100_000)
    n, leaves, _ = bench.case_sizes("16M/160", quick=True)
    assert leaves == 20 and n == 1_000_000  # quick: parameters /16, leaves /8
    assert bench.case_sizes("1000x64", quick=True) == (64_000, 1000, 64)  # never shrunk


def test_compile_time_is_a_column_of_every_jax_contender():
    params, grads = bench._host_data(3, 8, seed=0)
    contender = bench.make_rj("full", params, grads)
    assert contender.stats["compile_s"] > 0
    row = bench._row("10x64", 24, 3, "full", contender, contender.name, "ok", "", {})
    table = bench.format_table([row])
    header, row_line = table.splitlines()[0], table.splitlines()[2]
    assert header.split()[-4:] == ["compile", "s", "trace", "s"]
    assert contender.stats["trace_s"] > 0
    assert row_line.split()[-2:] == [
        f"{contender.stats['compile_s']:.2f}",
        f"{contender.stats['trace_s']:.2f}",
    ]


def test_compile_time_excludes_the_inspection_of_the_compiled_step(monkeypatch):
    """``compile s`` is XLA's compile alone: the HLO inspection after it (``compiled_stats``,
    0.14 s of a 1.0 s compile at 1000 leaves) is not counted."""
    inspection_s = 0.5

    def slow_stats(compiled):
        time.sleep(inspection_s)
        return {}

    monkeypatch.setattr(bench, "compiled_stats", slow_stats)
    params, grads = bench._host_data(3, 8, seed=0)
    contender = bench.make_rj("plain", params, grads)
    assert 0 < contender.stats["compile_s"] < inspection_s


def test_contiguous_contender_is_measured():
    """rj-contiguous is ``rj.contiguous(tx)``, measured like the others."""
    params, grad_sets = bench._host_data(leaves=3, size=8, seed=0)
    contender = bench.make_rj("full", params, grad_sets, contiguous=True)
    assert contender.name == "rj-contiguous"
    assert contender.run(3) > 0
    assert isinstance(contender.stats["fusions"], int) and contender.stats["passes"] >= 1


def test_page_faults_per_step_count_fresh_temporaries():
    """``faults/step``: a step that writes a fresh 64 MB array (mapped anew by the OS in every
    step: above glibc's largest mmap threshold, 32 MB) against one that writes a kept array."""
    import numpy as np

    kept = np.zeros(2**24, np.float32)
    fresh = bench.Contender("fresh", "", lambda: np.ones(2**24, np.float32), lambda: None)
    reused = bench.Contender("reused", "", lambda: kept.fill(1.0), lambda: None)
    bench.measure([fresh, reused], repeats=3, target_s=0.02)
    rows = [bench._row("x", 2**24, 1, "plain", c, c.name, "ok", "", {}) for c in (fresh, reused)]
    # 64 MB is 16,384 pages of 4 KB, or 32 huge pages of 2 MB where numpy gets them
    assert rows[0]["page_faults_per_step"] >= 32
    assert rows[1]["page_faults_per_step"] < rows[0]["page_faults_per_step"] / 8
    table = bench.format_table(rows).splitlines()
    assert "faults/step" in table[0]
    assert f"{rows[0]['page_faults_per_step']:.0f}" in table[2]
