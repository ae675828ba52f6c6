"""The settings object: every CLIP_ASSETS_* variable in one place, the docs' configuration table drawn from it."""

import os
import re

import pytest

from clip_assets.config.settings import REPO_ROOT, Settings, SettingsError, configuration_table, env_var

SETTINGS_VARIABLES = {env_var(name) for name in Settings.model_fields}


def from_environment(monkeypatch, variables: dict[str, str]) -> Settings:
    """Settings.from_env() in an environment with these CLIP_ASSETS_* variables and no others."""
    for name in list(os.environ):
        if name.upper().startswith("CLIP_ASSETS_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return Settings.from_env()


def docs_configuration_table() -> str:
    text = (REPO_ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    start = text.index("| variable | default | meaning |")
    end = text.index("\n\n", start)
    return text[start:end]


def test_docs_configuration_table_is_the_settings_objects():
    assert docs_configuration_table() == configuration_table(), (
        "docs/configuration.md's configuration table differs from clip_assets.config.settings: paste the output of "
        "`uv run python -m clip_assets.config.settings` over it"
    )


def test_every_variable_the_code_names_is_a_setting():
    named = set()
    for path in (REPO_ROOT / "clip_assets").rglob("*.py"):
        named |= set(re.findall(r"\bCLIP_ASSETS_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(encoding="utf-8")))
    assert named and named <= SETTINGS_VARIABLES, sorted(named - SETTINGS_VARIABLES)
    assert "CLIP_ASSETS_RESCAN_CRON" in SETTINGS_VARIABLES and "CLIP_ASSETS_K8S_MAX_CONCURRENT_STEPS" in SETTINGS_VARIABLES


def test_from_env_reads_types_aliases_and_leaves_empty_values_unset(tmp_path, monkeypatch):
    settings = from_environment(monkeypatch, {
        "CLIP_ASSETS_DATA_DIR": str(tmp_path), "CLIP_ASSETS_BATCH_SIZE": "8", "CLIP_ASSETS_FILE_TIMEOUT_S": "2.5",
        "CLIP_ASSETS_LABELS": "labels.csv", "CLIP_ASSETS_DEVICE": "", "CLIP_ASSETS_DUCKDB_WAIT_S": "3",
        "UNRELATED": "x",
    })
    assert settings.data_dir == tmp_path and settings.batch_size == 8 and settings.file_timeout_s == 2.5
    assert settings.labels_path.name == "labels.csv" and settings.device is None and settings.duckdb_wait_s == 3
    assert from_environment(monkeypatch, {}) == Settings()  # the defaults are the object's


def test_keyword_construction_takes_only_what_it_is_given(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIP_ASSETS_BATCH_SIZE", "3")
    monkeypatch.setenv("CLIP_ASSETS_LABELS", "labels.csv")
    settings = Settings(data_dir=tmp_path)
    assert settings.batch_size == 0 and settings.labels_path is None and settings.data_dir == tmp_path
    assert Settings.from_env().batch_size == 3  # the environment is from_env's to read


def test_an_invalid_value_is_one_error_naming_the_variable(monkeypatch):
    with pytest.raises(SettingsError) as err:
        from_environment(monkeypatch, {"CLIP_ASSETS_BATCH_SIZE": "abc", "CLIP_ASSETS_MAX_FAILURE_SHARE": "1.5"})
    message = str(err.value)
    assert "CLIP_ASSETS_BATCH_SIZE='abc'" in message and "valid integer" in message
    assert "CLIP_ASSETS_MAX_FAILURE_SHARE='1.5'" in message and "less than or equal to 1" in message


def test_the_fine_tuned_model_cannot_be_used_without_captions(monkeypatch):
    with pytest.raises(SettingsError, match="CLIP_ASSETS_USE_FINE_TUNED=.*CLIP_ASSETS_FINE_TUNE_CAPTIONS"):
        from_environment(monkeypatch, {"CLIP_ASSETS_USE_FINE_TUNED": "true"})
    opted_in = from_environment(monkeypatch, {"CLIP_ASSETS_USE_FINE_TUNED": "true", "CLIP_ASSETS_FINE_TUNE_CAPTIONS": "c.csv"})
    assert opted_in.use_fine_tuned and opted_in.fine_tune_captions.name == "c.csv"
    assert not from_environment(monkeypatch, {}).use_fine_tuned  # unset: nothing changes
