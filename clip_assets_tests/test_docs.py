"""The docs say how the code is now: the architecture page names every module of the package."""

from clip_assets.config.settings import REPO_ROOT


def test_the_architecture_page_names_every_module():
    page = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    package = REPO_ROOT / "clip_assets"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py" or "__pycache__" in path.parts:
            continue
        if f" {path.name} " not in page:
            missing.append(str(path.relative_to(REPO_ROOT)))
    assert not missing, f"docs/architecture.md does not list {missing}: add a line for each to its package tree"
