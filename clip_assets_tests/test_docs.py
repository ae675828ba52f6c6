"""The docs say how the code is now: the architecture page's package tree is the package's."""

import re

from clip_assets.config.settings import REPO_ROOT


def architecture_tree() -> set[str]:
    """The paths the package tree of docs/architecture.md names (two spaces of indent per level)."""
    page = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = page.split("## The package tree", 1)[1].split("```", 2)[1]
    paths, stack = set(), []
    for line in block.splitlines():
        found = re.match(r"^( *)(\S+)", line)
        if not found:
            continue
        depth, name = len(found[1]) // 2, found[2]
        stack[depth:] = [name.rstrip("/")]
        paths.add("/".join(stack))
    return paths


def test_the_architecture_page_names_every_module_where_it_is():
    modules = {
        str(p.relative_to(REPO_ROOT))
        for p in (REPO_ROOT / "clip_assets").rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    named = architecture_tree()
    assert modules <= named, f"docs/architecture.md does not list {sorted(modules - named)} in its package tree"
    gone = {p for p in named if p.endswith(".py")} - modules
    assert not gone, f"docs/architecture.md lists modules that are not in the package: {sorted(gone)}"
