import pytest

from clip_assets.prompts import PromptFileError, load_categories, prompt_version
from clip_assets.settings import REPO_ROOT

GOOD = """
# a comment
threshold = 0.1
neutral_margin = 0.02
neutral = ["a photo"]

[categories.cat]
positive = ["a cat", "a kitten"]
negative = ["a dog"]
neutral = ["an animal"]
threshold = 0.3

[categories.car]
positive = ["a car"]
neutral_margin = 0.5
"""


def write(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return tmp_path


def test_resolves_globals_and_overrides(tmp_path):
    cats = {c.name: c for c in load_categories(write(tmp_path, "a.toml", GOOD))}
    assert cats["cat"].threshold == 0.3 and cats["cat"].neutral_margin == 0.02
    assert cats["car"].threshold == 0.1 and cats["car"].neutral_margin == 0.5
    assert cats["cat"].neutral == ("a photo", "an animal") and cats["car"].neutral == ("a photo",)
    assert cats["car"].negative == () and cats["cat"].source == "a.toml"


def test_repo_prompts_are_valid():
    names = [c.name for c in load_categories(REPO_ROOT / "prompts")]
    assert {"circle", "square", "triangle", "star", "red", "green", "blue", "yellow"} <= set(names)


@pytest.mark.parametrize(
    "text, field, message",
    [
        ('[categories.cat]\npositive = []\n', "categories.cat.positive", "at least 1"),
        ('[categories.cat]\nnegative = ["x"]\n', "categories.cat.positive", "required"),
        ('[categories.cat]\npositive = ["a"]\ncolour = "red"\n', "categories.cat.colour", "Extra inputs"),
        ('treshold = 0.1\n[categories.cat]\npositive = ["a"]\n', "treshold", "Extra inputs"),
        ('threshold = "high"\n[categories.cat]\npositive = ["a"]\n', "threshold", "number"),
        ('[categories.cat]\npositive = ["a", "  "]\n', "categories.cat.positive", "non-empty"),
        ('neutral = ["x"]\n', "categories", "required"),
    ],
)
def test_broken_file_names_file_and_field(tmp_path, text, field, message):
    write(tmp_path, "broken.toml", text)
    with pytest.raises(PromptFileError, match=message) as info:
        load_categories(tmp_path)
    assert info.value.path == tmp_path / "broken.toml"
    assert info.value.field == field
    assert f"broken.toml: {field}" in str(info.value)


def test_invalid_toml_and_duplicate_table_are_refused(tmp_path):
    write(tmp_path, "a.toml", '[categories.cat]\npositive = ["a"]\n[categories.cat]\npositive = ["b"]\n')
    with pytest.raises(PromptFileError, match="a.toml.*not valid TOML"):
        load_categories(tmp_path)


def test_category_defined_in_two_files_is_refused(tmp_path):
    write(tmp_path, "a.toml", '[categories.cat]\npositive = ["a"]\n')
    write(tmp_path, "b.toml", '[categories.cat]\npositive = ["b"]\n')
    with pytest.raises(PromptFileError, match="already defined in .*a.toml") as info:
        load_categories(tmp_path)
    assert info.value.path.name == "b.toml" and info.value.field == "categories.cat"


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(PromptFileError, match="no prompt files"):
        load_categories(tmp_path)


def test_version_changes_with_content_only(tmp_path):
    write(tmp_path, "a.toml", GOOD)
    v1 = prompt_version(tmp_path)
    assert prompt_version(tmp_path) == v1
    write(tmp_path, "a.toml", GOOD.replace("a kitten", "a kitty"))
    assert prompt_version(tmp_path) != v1
