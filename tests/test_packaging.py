"""The wheel ships the library, not the repository's scripts; accelerator extras exist."""

import pathlib
import tomllib

import setuptools

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_wheel_packages_are_the_library_only():
    include = _project()["tool"]["setuptools"]["packages"]["find"]["include"]
    found = setuptools.find_packages(str(ROOT), include=include)
    tops = {name.split(".")[0] for name in found}
    assert tops == {"tokensparse", "kernels_pallas"}, tops
    assert "tokensparse.lemo" in found and "tokensparse.pipelines" in found


def test_accelerator_extras_pull_the_jax_plugins():
    extras = _project()["project"]["optional-dependencies"]
    assert any(req.startswith("jax[cuda12]") for req in extras["cuda12"])
    assert any(req.startswith("jax[tpu]") for req in extras["tpu"])


def test_shipped_selector_weights_are_package_data():
    data = _project()["tool"]["setuptools"]["package-data"]["tokensparse.lemo"]
    assert "weights/*.npz" in data
    assert list((ROOT / "tokensparse" / "lemo" / "weights").glob("*.npz"))
