"""Training captions for the demo model, each with what it claims, so the loss knows which
captions in a batch are true of which images.

A caption names every shape of its image or, for some two-shape images, only one of them (as people
caption photos), each by colour and kind, kind alone or colour alone, sometimes with the background
(its kind, and its tint when it has one), so the prompt file's neutral descriptions ("a striped
background", "a yellow background") are words the demo model knows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import permutations

from clip_assets.demo.shapes import Sample

TEMPLATES = ("{}", "a photo of {}", "an image of {}", "{}.")
BACKGROUND_WORDS = {"plain": "plain", "noise": "noisy", "gradient": "gradient", "stripes": "striped"}


@dataclass(frozen=True)
class Caption:
    text: str
    objects: tuple[tuple[str | None, str | None], ...]  # (colour, kind) claimed per shape; None: not said
    background: str | None  # None: not said
    background_tint: str | None = None  # None: not said

    def is_true_of(self, sample: Sample) -> bool:
        """Every claimed shape is a different shape of the image, and the background matches if named."""
        if self.background is not None and self.background != sample.background:
            return False
        if self.background_tint is not None and self.background_tint != sample.background_tint:
            return False
        facts = [(s.colour, s.shape) for s in sample.shapes]
        if len(self.objects) > len(facts):
            return False
        return any(
            all(c in (None, f[0]) and k in (None, f[1]) for (c, k), f in zip(self.objects, chosen))
            for chosen in permutations(facts, len(self.objects))
        )


def training_caption(sample: Sample, rng: random.Random, partial: float = 0.7, tints: bool = False) -> Caption:
    """Mostly kind-only wording: colour is learnt almost for free, shape needs the signal.

    With probability `partial` a two-shape image's caption names only one of its shapes, so a short
    description such as "a square" is also true of images with a square and something else.
    Half the captions name the background, in words people use ("a striped background"); with
    `tints` also its colour when it is tinted, so "a yellow background" means something to the model.
    """
    shapes = list(sample.shapes)
    if len(shapes) > 1 and rng.random() < partial:
        shapes = [rng.choice(shapes)]
    mode = rng.random()
    parts = []
    for s in shapes:
        if mode < 0.30:
            parts.append((f"a {s.colour} {s.shape}", (s.colour, s.shape)))
        elif mode < 0.82:
            parts.append((f"a {s.shape}", (None, s.shape)))
        elif mode < 0.95:
            parts.append((f"something {s.colour}", (s.colour, None)))
        else:
            parts.append((f"a {s.colour} shape", (s.colour, None)))
    rng.shuffle(parts)
    text = " and ".join(words for words, _ in parts)
    background = tint = None
    if rng.random() < 0.5:
        background, tint = _background_words(sample, rng, tints)
        text += f" on a {' '.join(filter(None, (tint, BACKGROUND_WORDS.get(background))))} background"
    return Caption(rng.choice(TEMPLATES).format(text), tuple(claim for _, claim in parts), background, tint)


def _background_words(sample: Sample, rng: random.Random, tints: bool) -> tuple[str | None, str | None]:
    """(kind, tint) a caption names: the kind, and with `tints` also the tint of a tinted background,
    or only its tint ("on a yellow background")."""
    if not (tints and sample.background_tint):
        return sample.background, None
    r = rng.random()
    return (None if r < 1 / 3 else sample.background), (sample.background_tint if r < 2 / 3 else None)
