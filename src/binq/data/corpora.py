"""Built-in public-domain texts, so calibration and evaluation work with no network.

The Hugging Face Hub (WikiText-2, C4, PTB) is often unreachable on machines that quantize models, so binq
ships real English prose inside the wheel, xz-compressed (``data/corpora/*.txt.xz``, Python ``lzma``
preset 9, byte-identical to the originals once decompressed). Sources and licences are in ``NOTICE``.

Following the GPTQ papers, calibration and evaluation should use different text: calibrate on ``austen``
(five novels) and evaluate on ``persuasion`` (the held-out sixth novel) and ``brit1911`` (encyclopedic
prose, the closest thing here to WikiText).
"""

from __future__ import annotations

import functools
import lzma
from importlib import resources
from pathlib import Path

from binq.errors import BinqError

__all__ = ["AUSTEN_JOIN", "AUSTEN_ORDER", "available_texts", "is_builtin", "load_text"]

# Short name -> vendored file stem (``<stem>.txt.xz`` in ``binq/data/corpora``).
_FILES: dict[str, str] = {
    "persuasion": "austen-persuasion",
    "brit1911": "britannica1911-shakespeare",
    "emma": "austen-emma",
    "mansfieldpark": "austen-mansfieldpark",
    "northangerabbey": "austen-northangerabbey",
    "prideprejudice": "austen-prideprejudice",
    "sensesensibility": "austen-sensesensibility",
}

#: The novels in ``austen``, in publication order (1811, 1813, 1814, 1815, 1817). The order is fixed
#: because it decides the token stream and so which windows a seed picks. *Persuasion* is left out on
#: purpose: it is the held-out evaluation novel.
AUSTEN_ORDER: tuple[str, ...] = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
)

#: Separator between novels in ``austen`` (the same one GPTQ uses to join WikiText-2 documents).
AUSTEN_JOIN = "\n\n"

_HUB_HINT = "the Hub sets wikitext2, ptb and c4 are accepted by calibration and evaluation, not here"


def available_texts() -> list[str]:
    """Names :func:`load_text` accepts besides file paths: the composite first, then single texts."""
    return ["austen", *_FILES]


@functools.cache  # an unbounded functools.lru_cache
def _builtin_text(name: str) -> str:
    """Decompress one built-in text (cached: ``austen`` and repeated runs reuse it)."""
    if name == "austen":
        return AUSTEN_JOIN.join(_builtin_text(novel) for novel in AUSTEN_ORDER)
    blob = (resources.files("binq.data") / "corpora" / f"{_FILES[name]}.txt.xz").read_bytes()
    return lzma.decompress(blob).decode("utf-8")


def load_text(name: str) -> str:
    """Return a built-in text by name, or the contents of a UTF-8 text file.

    Built-in names win over a file of the same name in the working directory, so a stray file called
    ``austen`` cannot silently change a calibration set.
    """
    if name in _FILES or name == "austen":
        return _builtin_text(name)
    path = Path(name).expanduser()
    if not path.is_file():
        raise BinqError(
            f"unknown text {name!r}: not a built-in name ({', '.join(available_texts())}) "
            f"and not an existing file ({_HUB_HINT})"
        )
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise BinqError(f"text file {str(path)!r} is not valid UTF-8 (byte {exc.start})") from exc
    except OSError as exc:
        raise BinqError(f"cannot read text file {str(path)!r}: {exc.strerror or exc}") from exc


def is_builtin(name: str) -> bool:
    """True for names served from the vendored corpora (used to describe evaluation sets)."""
    return name in _FILES or name == "austen"
