"""The words of the embedded world: the whole vocabulary of the tiny presets' tokenizer.

Tiny backbones use a word-level vocabulary so they run offline with no tokenizer download.
Appending words is safe; reordering or removing them changes every cached tiny θ0.
"""

SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "heart", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "gray")
SIZES = ("small", "medium", "large", "big", "tiny")
PLACES = ("left", "right", "top", "bottom", "middle", "center", "above", "below", "next", "side")
NUMBERS = ("no", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

FUNCTION_WORDS = (
    "a",
    "an",
    "the",
    "there",
    "is",
    "are",
    "isn't",
    "aren't",
    "not",
    "no",
    "of",
    "to",
    "in",
    "on",
    "at",
    "and",
    "or",
    "both",
    "each",
    "every",
    "exactly",
    "least",
    "most",
    "more",
    "fewer",
    "than",
    "same",
    "different",
    "as",
    "with",
    "without",
    "image",
    "images",
    "picture",
    "pictures",
    "scene",
    "object",
    "objects",
    "shape",
    "shapes",
    "thing",
    "things",
    "colour",
    "color",
    "size",
    "what",
    "which",
    "how",
    "many",
    "where",
    "does",
    "do",
    "contain",
    "contains",
    "has",
    "have",
    "only",
    "all",
    "some",
    "any",
    "other",
    "another",
    "it",
    "its",
    "that",
    "this",
    "these",
    "those",
    "one",
    "ones",
    "yes",
    "left",
    "right",
    "first",
    "second",
    "of",
    "by",
    "near",
    "far",
    "from",
    "together",
    "alone",
    "empty",
    "next",
    "to",
    "side",
)
PUNCTUATION = (".", ",", "?", "!", "'", "-")


def plural(word: str) -> str:
    """The plural of a shape name ("cross" → "crosses")."""
    return word + ("es" if word.endswith(("s", "x", "sh", "ch")) else "s")


def words() -> list[str]:
    """Every token, special tokens first, each once, in a fixed order."""
    seen: dict[str, None] = {}
    for group in (
        SPECIAL,
        SHAPES,
        tuple(plural(s) for s in SHAPES),
        COLOURS,
        SIZES,
        PLACES,
        NUMBERS,
        FUNCTION_WORDS,
        PUNCTUATION,
    ):
        for word in group:
            seen.setdefault(word, None)
    return list(seen)
