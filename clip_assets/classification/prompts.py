"""Prompt files: the human-edited descriptions of each category, validated before anything is encoded.

Each `*.toml` file under the prompts folder is one prompt set (TOML, so `#` comments are welcome):

    mode = "multi_label"      # or "single_label" (softmax over this file's categories)
    threshold = 0.02          # multi_label: matched when pos_sim - neg_sim >= threshold ...
    neutral_margin = 0.0      # ... and pos_sim >= neutral_sim + neutral_margin
    neutral = ["a photo"]     # global neutral descriptions, shared by every category of the file
    templates = ["a photo of a {}", "a picture of a {}"]   # expand `labels` into descriptions

    [categories.cat]
    labels = ["cat", "kitten"]                  # through the templates: "a photo of a cat", ...
    positive = ["a cat asleep on a sofa"]       # explicit descriptions, with or without labels
    negative = ["a dog"]                        # optional (negative_labels go through templates)
    neutral = ["an animal"]                     # optional, added to the global ones
    threshold = 0.05                            # optional override
    neutral_margin = 0.01                       # optional override

In single_label mode the threshold is the minimum softmax probability and `top_k` says how many of
the best categories count as matched; negative and neutral descriptions have no meaning there and
are refused. A broken file is refused with `PromptFileError`, which names the file and the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PROMPT_GLOB = "*.toml"
# Thresholds written by `clip-assets calibrate`: merged over the prompt files, not a prompt set itself.
OVERRIDES_FILE = "calibrated_thresholds.toml"
MULTI_LABEL = "multi_label"
SINGLE_LABEL = "single_label"


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and the field."""

    def __init__(self, path: Path, field: str | None, message: str):
        self.path = path
        self.field = field
        where = f"{path}: {field}" if field else str(path)
        super().__init__(f"Invalid prompt file {where}: {message}")


def _clean_descriptions(values: list[str]) -> list[str]:
    cleaned = [v.strip() for v in values]
    if any(not v for v in cleaned):
        raise ValueError("descriptions must be non-empty text")
    return cleaned


class CategoryPrompts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    positive: list[str] = Field(default_factory=list, description="What an image of this category shows.")
    labels: list[str] = Field(default_factory=list, description="Short labels, expanded through the templates.")
    negative: list[str] = Field(default_factory=list, description="Look-alikes that are not this category.")
    negative_labels: list[str] = Field(default_factory=list, description="Look-alike labels, through the templates.")
    neutral: list[str] = Field(default_factory=list, description="Added to the file's neutral descriptions.")
    threshold: float | None = None
    neutral_margin: float | None = None

    _clean = field_validator("positive", "labels", "negative", "negative_labels", "neutral")(_clean_descriptions)

    @model_validator(mode="after")
    def _has_positives(self) -> "CategoryPrompts":
        if not self.positive and not self.labels:
            raise ValueError("positive: needs at least one positive description (or a label)")
        return self


class PromptSetFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["multi_label", "single_label"] = MULTI_LABEL
    top_k: int = Field(default=1, ge=1, description="single_label: how many best categories are matched.")
    threshold: float = 0.0
    neutral_margin: float = 0.0
    neutral: list[str] = Field(default_factory=list)
    templates: list[str] = Field(default_factory=list)
    categories: dict[str, CategoryPrompts] = Field(min_length=1)

    _clean = field_validator("neutral", "templates")(_clean_descriptions)

    @field_validator("templates")
    @classmethod
    def _one_slot(cls, value: list[str]) -> list[str]:
        for template in value:
            if template.count("{}") != 1 or template.replace("{}", "").count("{") or template.count("}") != 1:
                raise ValueError(f"template {template!r} must contain exactly one {{}} and no other braces")
        return value

    @field_validator("categories")
    @classmethod
    def _names_are_text(cls, value: dict[str, CategoryPrompts]) -> dict[str, CategoryPrompts]:
        for name in value:
            if not name.strip():
                raise ValueError("category names must be non-empty")
        return value

    @model_validator(mode="after")
    def _single_label_has_no_negatives(self) -> "PromptSetFile":
        if self.mode == SINGLE_LABEL:
            if self.neutral:
                raise ValueError("neutral: single_label mode uses no neutral descriptions")
            for name, cat in self.categories.items():
                for key in ("negative", "negative_labels", "neutral", "neutral_margin"):
                    if getattr(cat, key):
                        raise ValueError(f"categories.{name}.{key}: not used in single_label mode")
        return self

    def expand(self, labels: list[str]) -> list[str]:
        if not self.templates:
            return list(labels)
        return [template.replace("{}", label) for label in labels for template in self.templates]


@dataclass(frozen=True)
class Category:
    """One category with every setting resolved: what the centroid and classification steps use."""

    name: str
    source: str  # prompt file name
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    neutral: tuple[str, ...]  # the file's global neutral descriptions, then the category's own
    threshold: float
    neutral_margin: float
    mode: str = MULTI_LABEL
    top_k: int = 1


def prompt_files(prompts_dir: Path) -> list[Path]:
    return sorted(p for p in prompts_dir.glob(PROMPT_GLOB) if p.name != OVERRIDES_FILE)


class CategoryOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = None
    neutral_margin: float | None = None


class ThresholdOverrides(BaseModel):
    """The calibrated_thresholds.toml file: per category, a threshold and neutral margin."""

    model_config = ConfigDict(extra="forbid")

    categories: dict[str, CategoryOverride] = Field(default_factory=dict)


def read_overrides(prompts_dir: Path) -> dict[str, CategoryOverride]:
    path = prompts_dir / OVERRIDES_FILE
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return ThresholdOverrides.model_validate(raw).categories
    except tomllib.TOMLDecodeError as exc:
        raise PromptFileError(path, None, f"not valid TOML ({exc})") from exc
    except ValidationError as exc:
        raise _refusal(path, exc) from exc


def prompt_version(prompts_dir: Path) -> str:
    """Hash of every prompt file's (and the overrides file's) name and bytes: changes whenever one does."""
    h = hashlib.sha256()
    overrides = [prompts_dir / OVERRIDES_FILE] if (prompts_dir / OVERRIDES_FILE).is_file() else []
    for path in prompt_files(prompts_dir) + overrides:
        h.update(path.name.encode())
        h.update(b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return h.hexdigest()[:16]


def _unique(descriptions: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(descriptions))


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _refusal(path: Path, exc: ValidationError) -> PromptFileError:
    """The first problem of a validation error, with the file and the field it concerns."""
    first = exc.errors()[0]
    field, message = _field_path(first["loc"]), first["msg"]
    # Whole-object validators name the field at the start of their message: "positive: ...".
    named = re.match(r"^Value error, ([\w.]+): (.*)$", message, re.S)
    if named:
        field = f"{field}.{named[1]}" if field else named[1]
        message = named[2]
    if first["type"] == "extra_forbidden":
        message += _did_you_mean(str(first["loc"][-1]))
    more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
    return PromptFileError(path, field, message + more)


def _did_you_mean(name: str) -> str:
    """'; did you mean 'positive'?' for a misspelt field name of a prompt or overrides file, else ''."""
    known = {f for model in (PromptSetFile, CategoryPrompts, ThresholdOverrides, CategoryOverride)
             for f in model.model_fields}
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
    return f"; did you mean {close[0]!r}?" if close else ""


def parse_prompt_file(path: Path) -> PromptSetFile:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PromptFileError(path, None, f"not valid TOML ({exc})") from exc
    except UnicodeDecodeError as exc:
        raise PromptFileError(path, None, f"not UTF-8 text ({exc})") from exc
    try:
        return PromptSetFile.model_validate(raw)
    except ValidationError as exc:
        raise _refusal(path, exc) from exc


def load_categories(prompts_dir: Path) -> list[Category]:
    """Every category of every prompt file, validated; a name used twice is an error.

    Thresholds in calibrated_thresholds.toml, when present, replace the prompt files' own.
    """
    files = prompt_files(prompts_dir)
    if not files:
        raise PromptFileError(prompts_dir, None, f"no prompt files ({PROMPT_GLOB}) found")
    categories: list[Category] = []
    seen: dict[str, tuple[str, Path]] = {}  # casefolded name -> (name as written, file)
    for path in files:
        parsed = parse_prompt_file(path)
        for name, cat in parsed.categories.items():
            if name.casefold() in seen:
                first_name, first_path = seen[name.casefold()]
                written = "" if first_name == name else f" as {first_name!r} (names are compared without case)"
                raise PromptFileError(path, f"categories.{name}", f"category already defined in {first_path}{written}")
            seen[name.casefold()] = (name, path)
            categories.append(
                Category(
                    name=name,
                    source=path.name,
                    positive=_unique(cat.positive + parsed.expand(cat.labels)),
                    negative=_unique(cat.negative + parsed.expand(cat.negative_labels)),
                    neutral=tuple(parsed.neutral) + tuple(cat.neutral),
                    threshold=parsed.threshold if cat.threshold is None else cat.threshold,
                    neutral_margin=parsed.neutral_margin if cat.neutral_margin is None else cat.neutral_margin,
                    mode=parsed.mode,
                    top_k=parsed.top_k,
                )
            )
    overrides = read_overrides(prompts_dir)
    unknown = sorted(name for name in overrides if name not in {n for n, _ in seen.values()})
    if unknown:
        raise PromptFileError(
            prompts_dir / OVERRIDES_FILE, f"categories.{unknown[0]}",
            "no prompt file defines this category; re-run `clip-assets calibrate` or delete the entry",
        )
    for i, cat in enumerate(categories):
        o = overrides.get(cat.name)
        if o is not None:
            categories[i] = dataclasses.replace(
                cat,
                threshold=cat.threshold if o.threshold is None else o.threshold,
                neutral_margin=cat.neutral_margin if o.neutral_margin is None else o.neutral_margin,
            )
    return categories
