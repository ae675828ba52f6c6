import pytest

from clip_assets.classification.prompts import PromptFileError, load_categories, prompt_version
from clip_assets.config.settings import REPO_ROOT

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
        ('[categories.cat]\npositive = []\n', "categories.cat.positive", "at least one positive"),
        ('[categories.cat]\nnegative = ["x"]\n', "categories.cat.positive", "at least one positive"),
        ('templates = ["a {} of {}"]\n[categories.cat]\nlabels = ["a"]\n', "templates", "exactly one"),
        ('mode = "single_label"\n[categories.cat]\npositive = ["a"]\nnegative = ["b"]\n', "categories.cat.negative", "single_label"),
        ('mode = "single_label"\nneutral = ["x"]\n[categories.cat]\npositive = ["a"]\n', "neutral", "single_label"),
        ('mode = "multi"\n[categories.cat]\npositive = ["a"]\n', "mode", "multi_label"),
        ('mode = "single_label"\ntop_k = 0\n[categories.cat]\npositive = ["a"]\n', "top_k", "greater than or equal to 1"),
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


def test_category_names_are_compared_without_case(tmp_path):
    write(tmp_path, "a.toml", '[categories.circle]\npositive = ["a circle"]\n')
    write(tmp_path, "b.toml", '[categories.Circle]\npositive = ["a round shape"]\n')
    with pytest.raises(PromptFileError, match=r"already defined in .*a.toml as 'circle' \(names are compared without case\)") as info:
        load_categories(tmp_path)
    assert info.value.path.name == "b.toml" and info.value.field == "categories.Circle"
    (tmp_path / "b.toml").unlink()
    write(tmp_path, "a.toml", '[categories.circle]\npositive = ["a"]\n[categories.CIRCLE]\npositive = ["b"]\n')
    with pytest.raises(PromptFileError, match="already defined in .*a.toml as 'circle'"):
        load_categories(tmp_path)


@pytest.mark.parametrize(
    "text, field, suggestion",
    [
        ('[categories.star]\npositve = ["a star"]\n', "categories.star.positve", "did you mean 'positive'?"),
        ('treshold = 0.1\n[categories.star]\npositive = ["a star"]\n', "treshold", "did you mean 'threshold'?"),
        ('[categories.star]\npositive = ["a"]\nnuetral_margin = 0.1\n', "categories.star.nuetral_margin",
         "did you mean 'neutral_margin'?"),
    ],
)
def test_a_misspelt_field_is_refused_with_the_field_it_may_mean(tmp_path, text, field, suggestion):
    write(tmp_path, "broken.toml", text)
    with pytest.raises(PromptFileError) as info:
        load_categories(tmp_path)
    assert info.value.field == field and "Extra inputs are not permitted" in str(info.value)
    assert str(info.value).endswith(suggestion)


def test_a_field_like_no_other_gets_no_suggestion(tmp_path):
    write(tmp_path, "broken.toml", '[categories.cat]\npositive = ["a"]\ncolour = "red"\n')
    with pytest.raises(PromptFileError) as info:
        load_categories(tmp_path)
    assert "did you mean" not in str(info.value)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(PromptFileError, match="no prompt files"):
        load_categories(tmp_path)


def test_version_changes_with_content_only(tmp_path):
    write(tmp_path, "a.toml", GOOD)
    v1 = prompt_version(tmp_path)
    assert prompt_version(tmp_path) == v1
    write(tmp_path, "a.toml", GOOD.replace("a kitten", "a kitty"))
    assert prompt_version(tmp_path) != v1


def test_templates_expand_labels_and_keep_explicit_descriptions(tmp_path):
    write(
        tmp_path,
        "t.toml",
        'templates = ["a photo of a {}", "a drawing of a {}"]\n'
        '[categories.cat]\nlabels = ["cat", "kitten"]\npositive = ["a cat asleep"]\nnegative_labels = ["dog"]\n',
    )
    (cat,) = load_categories(tmp_path)
    assert cat.positive == (
        "a cat asleep", "a photo of a cat", "a drawing of a cat", "a photo of a kitten", "a drawing of a kitten",
    )
    assert cat.negative == ("a photo of a dog", "a drawing of a dog")


def test_single_label_mode_and_non_english_descriptions(tmp_path):
    write(
        tmp_path,
        "s.toml",
        'mode = "single_label"\ntop_k = 2\nthreshold = 0.2\n'
        '[categories.chat]\npositive = ["une photo d\'un chat", "猫の写真"]\n[categories.chien]\nlabels = ["Hund"]\n',
    )
    cats = {c.name: c for c in load_categories(tmp_path)}
    assert cats["chat"].mode == "single_label" and cats["chat"].top_k == 2 and cats["chat"].threshold == 0.2
    assert cats["chat"].positive == ("une photo d'un chat", "猫の写真") and cats["chien"].positive == ("Hund",)


def test_the_single_label_example_file_is_valid(tmp_path):
    example = REPO_ROOT / "prompts" / "examples" / "pets_single_label.toml.example"
    (tmp_path / "pets.toml").write_text(example.read_text())
    cats = {c.name: c for c in load_categories(tmp_path)}
    assert set(cats) == {"cat", "dog", "bird"} and all(c.mode == "single_label" for c in cats.values())
    assert "a close-up photo of a kitten" in cats["cat"].positive and cats["dog"].threshold == 0.40
