"""The committed notebooks execute without error (nbclient) and print the porting differences."""

import pathlib
import shutil

import nbclient
import nbformat
import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == [
        "01_quickstart.ipynb",
        "02_porting.ipynb",
        "03_performance_and_memory.ipynb",
        "04_data_parallel.ipynb",
    ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path, tmp_path):
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    nb = nbformat.read(copy, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    images = sum(
        "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
    )
    assert images >= 1
    if "porting" in path.name:
        diffs = [
            float(line.rsplit(":", 1)[1])
            for line in text.splitlines()
            if "max |loss difference|" in line
        ]
        assert len(diffs) == 2 and max(diffs) < 1e-5, text
    if "data_parallel" in path.name:
        diff = [
            float(line.rsplit(":", 1)[1])
            for line in text.splitlines()
            if "param difference" in line
        ]
        assert diff and diff[0] < 1e-5, text
    if "memory" in path.name:
        int8 = [float(line.split()[1]) for line in text.splitlines() if line.startswith("int8 ")]
        assert int8 and int8[0] <= 1.05, text
