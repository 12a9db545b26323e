"""The suite's ``xdist_group`` marks keep a shared module fixture on one worker."""

import pathlib
import subprocess
import sys

TESTS = pathlib.Path(__file__).parent

_CASES = '''
import os, time, pytest

@pytest.fixture(scope="module")
def shared():
    with open(os.environ["BUILD_LOG"], "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "-") + "\\n")

@pytest.mark.xdist_group("g")
def test_a(shared): time.sleep(0.2)

def test_b(): time.sleep(0.2)

@pytest.mark.xdist_group("g")
@pytest.mark.parametrize("i", [0, 1, 2])
def test_c(shared, i): time.sleep(0.2)

def test_d(): time.sleep(0.2)
'''


def test_a_groups_module_fixture_is_built_once_on_two_workers(tmp_path):
    (tmp_path / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(TESTS)!r})\npytest_plugins = ['_xdist_groups']\n")
    (tmp_path / "test_cases.py").write_text(_CASES)
    log = tmp_path / "built.log"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup",
                           "-p", "no:cacheprovider", "test_cases.py"], cwd=tmp_path,
                          env={"BUILD_LOG": str(log), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "6 passed" in done.stdout, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(log.read_text().split()) == 1, log.read_text()  # one build, on one worker
