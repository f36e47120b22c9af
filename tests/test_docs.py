"""The docs name code that exists: every `file.py:name` (or `file.py:Class.method`) reference in docs/*.md and the
README points at a file of the repository that defines that name, and the docstring citations point at docs that
exist, by their path."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
README = ROOT / "README.md"
# `modeling_cloc/modeling_cloc.py:CLOCModel.loss_from_features`, `binding_occlip.py:OCCLIPBindingLayer.forward`
REFERENCE = re.compile(r"`((?:[\w]+/)*[\w]+\.py):([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)*)`")


def _find(path: str) -> Path:
    """A reference's file: a repository path, or a bare file name that is unique in the repository."""
    if (ROOT / path).is_file():
        return ROOT / path
    # Tracked sources only: a virtual environment or a `pip install .` build/ copy holds the same file names.
    ignored = {".venv", "build", "dist"}
    matches = [
        p
        for p in ROOT.rglob(Path(path).name)
        if not ignored & set(p.relative_to(ROOT).parts) and p.as_posix().endswith(path)
    ]
    assert len(matches) == 1, f"{path}: {len(matches)} files match"
    return matches[0]


def _defines(source: str, name: str) -> bool:
    pattern = rf"^\s*(?:def|class)\s+{re.escape(name)}\b|^\s*{re.escape(name)}\s*[:=]"
    return re.search(pattern, source, flags=re.MULTILINE) is not None


def references():
    return [(doc.name, *match) for doc in [*DOCS, README] for match in REFERENCE.findall(doc.read_text())]


def test_the_docs_hold_references():
    names = {doc.name for doc in DOCS}
    assert {"occlip.md", "cloc.md", "data.md", "design.md"} <= names
    counts = {name: sum(1 for ref in references() if ref[0] == name) for name in ("occlip.md", "cloc.md", "data.md")}
    assert all(count >= 5 for count in counts.values()), counts


@pytest.mark.parametrize("doc,path,name", references())
def test_every_code_reference_in_the_docs_exists(doc, path, name):
    source = _find(path).read_text()
    for part in name.split("."):  # a class, then its method
        assert _defines(source, part), f"{doc}: {path} defines no {part!r} (reference {path}:{name})"


def test_docstring_citations_name_docs_that_exist():
    """A citation of a method note (`docs/occlip.md` and the like) names a file under docs/."""
    listed = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.yaml"], cwd=ROOT, capture_output=True, text=True)
    cited = set()
    for path in listed.stdout.split():
        cited |= set(re.findall(r"docs/([\w-]+\.md)", (ROOT / path).read_text()))
    assert cited and all((ROOT / "docs" / name).is_file() for name in cited), sorted(cited)


def test_docstrings_cite_the_notes_by_their_path():
    """A method note is cited as `docs/occlip.md`, never by its bare file name, which no reader can open."""
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True)
    bare = re.compile(r"`((?:occlip|cloc|data|design|engineering)\.md)`")
    offenders = [
        f"{path}:{number}: {line.strip()}"
        for path in listed.stdout.split()
        for number, line in enumerate((ROOT / path).read_text().splitlines(), 1)
        if bare.search(line)
    ]
    assert offenders == []


def test_the_contributors_section_names_the_equations_and_the_family_registry():
    section = README.read_text().split("## For contributors", 1)[1]
    cited = {name for doc, _, name in references() if doc == "README.md"}
    assert {"occlip_loss", "OCCLIPModel.relation_loss_terms", "OCCLIPModel.score", "contrastive_loss"} <= cited
    assert {"cloc_loss", "CLOCPrompter", "OCCLIPLoss", "CLOCLoss", "ModelFamily", "FAMILIES"} <= cited
    assert "docs/occlip.md" in section and "docs/cloc.md" in section


def test_readme_caches_the_tokens_the_prompter_reads():
    """The README's CLOC example caches `get_image_tokens` (the layer `vision_feature_layer` names), not the
    tower's last hidden state, which differs whenever the Prompter reads an earlier layer (the demo reads layer 1)."""
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("## CLOC (model core)") :]
    block = block[: block.index("```\n", block.index("```python") + 3)]
    assert "get_image_tokens(" in block and "last_hidden_state" not in block
