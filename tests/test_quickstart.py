"""The README quickstart runs as written: LeMo fine-tuning of SmolLM2, memory, export, generation.

The commands are read from the README's quickstart block (only the output directory is changed to a
temporary one) and must be the ones ``make run`` runs."""

import json
import pathlib
import re
import shlex
import subprocess

import pytest
from _env import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DIR = "workdirs/quickstart"


def quickstart_commands() -> list[str]:
    """The ``python -m ...`` commands of the README's quickstart block, continuation lines joined."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    script = next(b for b in blocks if "python -m experiments.finetune" in b)
    joined = re.sub(r"\\\n\s*", "", script)
    return [line.split("#")[0].strip() for line in joined.splitlines()
            if line.strip().startswith("python -m")]


def test_make_run_runs_the_readme_quickstart():
    # -o: treat the set-up stamp as made, whether or not a venv exists (a fresh clone has none)
    dry = subprocess.run(["make", "-n", "run", "-o", ".venv/.installed", "BIN=.venv/bin"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    made = [re.sub(r"^\.venv/bin/", "", line.strip()) for line in re.sub(r"\\\n\s*", "", dry).splitlines()
            if "python -m" in line]
    assert [shlex.split(c) for c in made] == [shlex.split(c) for c in quickstart_commands()]


@pytest.mark.slow
def test_readme_quickstart_runs_as_written(tmp_path):
    env = subprocess_env()
    outputs = []
    for command in quickstart_commands():
        args = shlex.split(command.replace(DEFAULT_DIR, str(tmp_path)))
        done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), *args[1:]], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout)
    memory = json.loads((tmp_path / "memory.json").read_text())
    assert memory["summary"], memory  # the fair LoRA / LeMo ratios at the quickstart length
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["val_loss"] < 10
    assert (tmp_path / "merged" / "config.json").is_file()
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert outputs[-1].startswith("ROMEO:") and len(outputs[-1].strip()) > len("ROMEO:")


@pytest.mark.slow
def test_readme_library_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Library", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    check = ("\nimport math\nassert math.isfinite(float(metrics['loss']))\n"
             "assert (pathlib.Path('out') / 'config.json').is_file()\n")
    done = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c",
                           "import pathlib\n" + code + check], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
