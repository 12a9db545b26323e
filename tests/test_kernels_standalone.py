"""``kernels_pallas`` and its tests stand alone: they import nothing from ``tokensparse``.

Statically (every import in the package and in the kernel test modules) and by running the kernel
tests' core checks in a child process where ``tokensparse`` cannot be imported: a ``sys.meta_path``
finder installed before pytest starts (no conftest involved) raises ImportError for it.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

from _env import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_TESTS = ("test_segment_attention.py", "test_segment_attention_tpu.py", "test_block_scores.py")

# Core checks: each kernel against its dense reference, the schedule and the argument checks.
CORE = (
    "tests/test_segment_attention.py::test_matches_reference[f32-gqa-causal]",
    "tests/test_segment_attention.py::test_dense_causal_tile_skipping_schedule",
    "tests/test_segment_attention_tpu.py::test_schedule_skips_other_documents",
    "tests/test_segment_attention_tpu.py::test_rejects_blocks_that_are_not_lane_multiples",
    "tests/test_block_scores.py::test_tiles_equal_dense_reference[gqa_ragged_tail]",
    "tests/test_block_scores.py::test_bad_arguments_are_rejected",
)

BOOTSTRAP = """
import sys

class BlockTokensparse:
    def find_spec(self, name, path=None, target=None):
        if name == "tokensparse" or name.startswith("tokensparse."):
            raise ImportError(f"{name} is blocked: kernels_pallas must stand alone")
        return None

sys.meta_path.insert(0, BlockTokensparse())
try:
    import tokensparse  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("the blocker did not block tokensparse")

import pytest

code = pytest.main(sys.argv[1:])
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "tokensparse")
sys.exit(f"tokensparse modules were imported: {leaked}" if leaked else int(code))
"""


def _imported_modules(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_no_tokensparse_imports_in_kernels_or_their_tests():
    files = sorted((ROOT / "kernels_pallas").glob("*.py"))
    files += [ROOT / "tests" / name for name in KERNEL_TESTS]
    for path in files:
        bad = {m for m in _imported_modules(path) if m.split(".")[0] == "tokensparse"}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_kernel_core_checks_pass_without_tokensparse():
    env = subprocess_env()
    env.pop("TOKENSPARSE_PALLAS_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, "-q", "-p", "no:xdist", "-p", "no:cacheprovider", *CORE],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert f"{len(CORE)} passed" in done.stdout, done.stdout[-2000:]
