"""The notebooks in notebooks/ are valid nbformat-4 files without outputs, and each runs top to bottom
in its tiny configuration and shows what it promises.

Each notebook runs in its own Python process (the suite's 8 simulated devices and XLA flags must not
leak into it) through a tiny executor: code cells in order, in one namespace, with IPython lines
(``!cmd``, ``%magic``) replaced by ``pass``. The executor records each cell's wall time and the
notebook's plain scalar and list variables in a JSON file, which the assertions read.
"""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
from _env import FAST_COMPILE, subprocess_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("quickstart.ipynb", "subllm.ipynb", "predictors.ipynb")
SIZE_VAR = "TOKENSPARSE_NOTEBOOK_SIZE"

_IPYTHON_LINE = r"^(\s*)[!%]"  # IPython-only lines (shell escapes, magics) become `pass`

RUNNER = r'''
import json, pathlib, re, resource, sys, time
import matplotlib
matplotlib.use("Agg")
notebook, out, pattern = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), re.compile(sys.argv[3])
ns = {"__name__": "__main__"}
cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
seconds = []
for i, cell in enumerate(cells):
    src = "".join(cell["source"])
    lines = [pattern.sub(r"\1pass  # ", line) for line in src.split("\n")]
    start = time.perf_counter()
    exec(compile("\n".join(lines), f"{notebook.name} cell {i}", "exec"), ns)
    seconds.append(time.perf_counter() - start)
    sys.stdout.flush()

def plain(v):
    if isinstance(v, bool | int | float | str) or v is None:
        return True
    return isinstance(v, list | tuple) and all(isinstance(x, bool | int | float | str) for x in v)

values = {k: v for k, v in ns.items() if not k.startswith("_") and plain(v)}
usage = resource.getrusage(resource.RUSAGE_SELF)
out.write_text(json.dumps({"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
                           "values": values}))
'''


def code_source(cell: dict) -> str:
    """A code cell's source with IPython-only lines turned into ``pass`` (same indentation)."""
    src = "".join(cell["source"])
    return "\n".join(re.sub(_IPYTHON_LINE, r"\1pass  # ", line) for line in src.split("\n"))


def load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text())


def execute(notebook: pathlib.Path, workdir: pathlib.Path, timeout: int = 600) -> tuple[dict, str]:
    """Run ``notebook`` in a fresh process inside ``workdir``: (recorded values, stdout)."""
    env = {k: v for k, v in subprocess_env().items() if k not in (SIZE_VAR, "TOKENSPARSE_BASE")}
    env.update({SIZE_VAR: "tiny", "MPLBACKEND": "Agg",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))})
    out = workdir / "executed.json"
    cmd = [sys.executable, "-c", RUNNER, str(notebook), str(out), _IPYTHON_LINE]
    try:
        done = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{notebook.name} did not finish in {timeout} s; output so far:\n{e.stdout}\n{e.stderr}")
    assert done.returncode == 0, f"{notebook.name} failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    result = json.loads(out.read_text())
    print(f"{notebook.name}: {sum(result['seconds']):.1f} s ({result['cpu_seconds']:.0f} CPU s); "
          f"cells {[round(s, 1) for s in result['seconds']]}")
    return result["values"], done.stdout


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_valid_nbformat4_without_outputs(name):
    nb = load(name)
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    kinds = [c["cell_type"] for c in nb["cells"]]
    assert set(kinds) <= {"markdown", "code"}, kinds
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 4 and kinds.count("code") >= 4
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids)
    for cell in nb["cells"]:
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        assert isinstance(cell["metadata"], dict)
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, "outputs are stored"
            ast.parse(code_source(cell))  # valid Python once IPython lines are dropped
        else:
            assert "outputs" not in cell and "execution_count" not in cell


@pytest.mark.parametrize("name", NAMES)
def test_notebook_has_the_size_switch_and_colab_install(name):
    code = ["".join(c["source"]) for c in load(name)["cells"] if c["cell_type"] == "code"]
    switch = [i for i, src in enumerate(code) if SIZE_VAR in src]
    assert len(switch) == 1 and switch[0] <= 2, "one configuration cell near the top"
    src = code[switch[0]]
    assert re.search(rf'os\.environ\.get\("{SIZE_VAR}", "tiny"\)', src), src
    assert re.search(r'^TINY = .*== "tiny"', src, re.MULTILINE), src
    assert "if TINY:" in src and "else:" in src
    assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in src
    before_jax = "\n".join(code[:switch[0] + 1])
    assert "import jax" not in before_jax, "the environment must be set before JAX is imported"
    install = [src for src in code if "%pip install" in src]
    assert len(install) == 1 and "google.colab" in install[0]


def test_readme_lists_every_notebook():
    readme = (NOTEBOOKS / "README.md").read_text()
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(NAMES)
    for name in NAMES:
        assert name in readme


def test_executor_drops_ipython_lines_and_keeps_blocks_valid():
    cell = {"source": ["if False:\n", "    %pip install x\n", "!ls\n", "y = 1"]}
    assert code_source(cell) == "if False:\n    pass  # pip install x\npass  # ls\ny = 1"
    ast.parse(code_source(cell))


def _notebook(tmp_path, *sources) -> pathlib.Path:
    cells = [{"cell_type": "code", "id": str(i), "metadata": {}, "execution_count": None, "outputs": [],
              "source": src.splitlines(keepends=True)} for i, src in enumerate(sources)]
    path = tmp_path / "scratch.ipynb"
    path.write_text(json.dumps({"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}))
    return path


def test_executor_runs_cells_in_one_clean_namespace_and_reports_failures(tmp_path):
    path = _notebook(tmp_path, "import os\nif True:\n    %pip install nothing\n!ls\nx = 2",
                     "flags = os.environ['XLA_FLAGS']\nsize = os.environ['TOKENSPARSE_NOTEBOOK_SIZE']\n"
                     "y = [x, 3.5]\nprint('done', x)\nopen('written.txt', 'w').write('z')")
    values, stdout = execute(path, tmp_path)
    assert values["y"] == [2, 3.5] and values["flags"] == FAST_COMPILE and values["size"] == "tiny"
    assert "done 2" in stdout and (tmp_path / "written.txt").is_file()
    with pytest.raises(AssertionError, match="ValueError: boom"):
        execute(_notebook(tmp_path, "x = 1", "raise ValueError('boom')"), tmp_path)


# ----------------------------------------------------------------------------- execution


@pytest.mark.slow
def test_quickstart_runs(tmp_path):
    values, stdout = execute(NOTEBOOKS / "quickstart.ipynb", tmp_path)
    assert values["TINY"] is True and values["BASE"] == ""
    # Compile-only memory: LeMo's sparse layers hold q, k, v and attention for 40% of the rows.
    assert 0 < values["lemo_temp"] < values["lora_temp"], values
    assert values["memory_ratio"] > 1.2 and f"{values['memory_ratio']:.2f}x" in stdout
    ratios = values["keep_ratios"]
    assert ratios.count(0.4) == 2 and ratios.count(1.0) == len(ratios) - 2
    losses = values["losses"]
    assert len(losses) == values["STEPS"] and all(map(_finite, losses))
    assert sum(losses[-5:]) / 5 < losses[0], losses
    assert _finite(values["val_loss_after"]) and values["val_loss_after"] < values["val_loss_before"]
    assert "dense validation loss after" in stdout


@pytest.mark.slow
def test_subllm_runs(tmp_path):
    values, stdout = execute(NOTEBOOKS / "subllm.ipynb", tmp_path)
    assert values["TINY"] is True
    losses = values["losses"]
    assert len(losses) == values["STEPS"] and all(map(_finite, losses))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses  # from ~ln(512) toward the unigram level
    top, level1, level2 = values["level_tokens"]
    assert top == values["SEQ_LEN"] > level1 > level2 > 0
    # Generation: exactly the requested number of new tokens, decoded after the prompt.
    assert values["n_generated"] == values["NEW_TOKENS"]
    assert values["text"].startswith(values["PROMPT"]) and len(values["text"]) > len(values["PROMPT"])
    assert values["text"] in stdout


@pytest.mark.slow
def test_predictors_runs(tmp_path):
    values, stdout = execute(NOTEBOOKS / "predictors.ipynb", tmp_path)
    assert values["TINY"] is True
    png = tmp_path / values["FIGURE"]
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    kept = values["oracle_kept_per_layer"]
    assert len(kept) == values["N_LAYERS"] and set(kept) == {values["blocks_kept"]}
    assert values["blocks_kept"] == int(values["KEEP"] * values["WINDOW"] // values["BLOCK"])
    pre = values["pretrain_losses"]
    assert all(map(_finite, pre)) and pre[-1] < pre[0]
    recall = values["recall"]
    assert values["SPARSE_LAYERS"] == [1, 2]  # "half" on 4 layers: L/2-1 ... L-2
    assert len(recall) == 2 and all(0.0 <= r <= 1.0 for r in recall)
    pred = values["predictor_losses"]
    assert all(map(_finite, pred)) and pred[-1] < pred[0]
    assert (tmp_path / "predictors_run" / "predictors").is_dir()
    assert "recall" in stdout


def _finite(x) -> bool:
    return isinstance(x, float) and x == x and abs(x) != float("inf")
