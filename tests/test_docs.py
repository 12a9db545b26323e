"""The documentation a user of the repository reads: the README's order, links that resolve inside the
repository, no pointers to files outside it, and the facts the docs must state (the zoo model's
quantization, the peft version the PEFT export follows, the data formats)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "notebooks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _headings() -> list[str]:
    return re.findall(r"^## (.+)$", README.read_text(), re.M)


def test_readme_order_usage_first_then_results_and_limitations():
    order = [h.split(":")[0].split(" to a mesh")[0] for h in _headings()]
    wanted = ["Install", "Quickstart", "Library", "Command line", "Results", "Limitations"]
    positions = [order.index(name) for name in wanted]
    assert positions == sorted(positions), order
    # Every other usage section comes before the results.
    assert all(order.index(h) < order.index("Results") for h in ("Notebooks", "Scaling"))
    intro = README.read_text().split("\n## ", 1)[0]
    assert "Token-sparse training" in intro  # it leads with what it is


def test_every_linked_file_is_in_the_repository():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)", doc.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)} links {target}"
        for target in re.findall(r"`((?:docs|notebooks)/[\w./-]+\.(?:md|ipynb))`", doc.read_text()):
            assert (ROOT / target).exists(), f"{doc.relative_to(ROOT)} names {target}"


def test_no_pointers_outside_the_repository():
    files = DOCS + sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in files:
        text = path.read_text()
        for bad in ("../shared", "DESIGN.md", "shared/DESIGN"):
            assert bad not in text, f"{path.relative_to(ROOT)} mentions {bad}"
        # Nor to the issue tracker the repository does not ship.
        assert not re.search(r"\bissues?\b( #?\d+|'s)|the issue\b", text), path.relative_to(ROOT)


def test_readme_states_install_quantization_and_data_formats():
    text = README.read_text()
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    for extra in ('".[cuda12]"', '".[tpu]"', "Colab"):
        assert extra in install, extra
    assert "Q4_1" in text and "GGUF" in text  # the zoo model is quantized, and the README says so
    for fmt in ("`.txt`", "`.jsonl`", "`text` field", "--config.data.source=PATH",
                "--config.data.tokenizer=PATH"):
        assert fmt in text, fmt


def test_docs_cite_the_peft_version_the_export_follows():
    from tokensparse import export

    text = (ROOT / "docs" / "export.md").read_text()
    assert f"peft {export.PEFT_VERSION}" in text


def test_readme_lemo_commands_use_the_recommended_recipe():
    """Every README command that fine-tunes the zoo model with LeMo keeps the quickstart's keep ratio
    (the defaults' keep 0.4 costs more perplexity on SmolLM2)."""
    from experiments.configs import quickstart

    keep = quickstart.get_config().lemo.keep_ratio
    commands = re.sub(r"\\\n\s*", "", README.read_text())
    lemo = [line for line in commands.splitlines() if "python -m experiments.finetune" in line
            and "--config.method=lemo" in line and "smollm2-135m" in line]
    assert lemo
    for line in lemo:
        assert f"--config.lemo.keep_ratio={keep:g}" in line, line


def _notebook_markdown(path: pathlib.Path) -> str:
    import json

    cells = json.loads(path.read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


def test_no_section_citations_and_each_method_names_its_sources():
    """A reader has only the repository: no "§" section numbers of a document it does not ship, and
    each method's page says what "the spec" means by naming its public paper (arXiv id) in a Sources
    section, which the README's results link to."""
    texts = {str(doc.relative_to(ROOT)): doc.read_text() for doc in DOCS}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        texts[str(nb.relative_to(ROOT))] = _notebook_markdown(nb)
    for name, text in texts.items():
        assert "§" not in text, f"{name} cites a section number"
    for page, arxiv in (("docs/lemo.md", "2501.09767"), ("docs/subllm.md", "2406.06571")):
        assert arxiv in texts[page], f"{page} does not name its paper"
        assert re.search(r"^## Sources$", texts[page], re.M), f"{page} has no Sources section"
