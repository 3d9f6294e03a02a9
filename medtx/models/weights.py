"""Weights files a user points to (LPIPS, EVA-02): read as a state dict, or one line
naming the file and what is wrong with it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from medtx.errors import MedtxError
from medtx.io import sha256


def read_state_file(
    path: Path, where: str, expected_sha256: str | None = None
) -> tuple[Mapping[str, Any], str]:
    """(the mapping ``torch.load(weights_only=True)`` reads from ``path``, the file's
    sha256). ``where`` starts every error line. With ``expected_sha256`` the hash is
    checked before the file is unpickled."""
    if not path.is_file():
        raise MedtxError(f"{where}: no such file")
    try:
        digest = sha256(path)
        if expected_sha256 is not None and digest != expected_sha256.lower():
            raise MedtxError(
                f"{where}: sha256 {digest[:12]}..., not the expected {expected_sha256[:12]}..."
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
    except MedtxError:
        raise
    except Exception as err:  # OSError, pickle and zip errors have no common base
        first = (str(err).strip().splitlines() or [""])[0]
        raise MedtxError(f"{where}: cannot read it ({type(err).__name__}: {first})") from err
    if not isinstance(state, Mapping):
        raise MedtxError(f"{where}: not a state dict but a {type(state).__name__}")
    return state, digest
