"""Training captions for the demo model, each with what it claims, so the loss knows which
captions in a batch are true of which images.

A caption names every shape of its image or, for some two-shape images, only one of them (as people
caption photos), each by colour and kind, kind alone or colour alone, sometimes with the background.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import permutations

from clip_assets.demo.shapes import Sample

TEMPLATES = ("{}", "a photo of {}", "an image of {}", "{}.")


@dataclass(frozen=True)
class Caption:
    text: str
    objects: tuple[tuple[str | None, str | None], ...]  # (colour, kind) claimed per shape; None: not said
    background: str | None  # None: not said

    def is_true_of(self, sample: Sample) -> bool:
        """Every claimed shape is a different shape of the image, and the background matches if named."""
        if self.background is not None and self.background != sample.background:
            return False
        facts = [(s.colour, s.shape) for s in sample.shapes]
        if len(self.objects) > len(facts):
            return False
        return any(
            all(c in (None, f[0]) and k in (None, f[1]) for (c, k), f in zip(self.objects, chosen))
            for chosen in permutations(facts, len(self.objects))
        )


GENERIC = ("a shape", "some shapes", "a picture", "a drawing")


def generic_caption(sample: Sample, rng: random.Random) -> Caption:
    """A caption true of every image ("a picture"), or of every image on its background
    ("a shape on a striped background"): what a prompt file's neutral descriptions say."""
    text = rng.choice(TEMPLATES).format(rng.choice(GENERIC))
    if rng.random() < 0.5:
        return Caption(text, (), None)
    return Caption(f"{text} on a {sample.background} background", (), sample.background)


def training_caption(sample: Sample, rng: random.Random, partial: float = 0.7, generic: float = 0.0) -> Caption:
    """Mostly kind-only wording: colour is learnt almost for free, shape needs the signal.

    With probability `partial` a two-shape image's caption names only one of its shapes, so a short
    description such as "a square" is also true of images with a square and something else. With
    probability `generic` it names no shape at all (see generic_caption).
    """
    if generic and rng.random() < generic:
        return generic_caption(sample, rng)
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
    background = None
    if rng.random() < 0.5:
        background = sample.background
        text += f" on a {background} background"
    return Caption(rng.choice(TEMPLATES).format(text), tuple(claim for _, claim in parts), background)
