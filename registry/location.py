"""Where the registry file lives: ``$QCONV_HOME/registry.db``, else the user's data dir."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REGISTRY_FILENAME = "registry.db"
APP_NAME = "qconv"


def user_data_dir() -> Path:
    """The platform's per-user data folder for qconv, without a dependency such as platformdirs.

    Linux and other Unixes follow the XDG base directory spec (``$XDG_DATA_HOME``, which must be
    absolute to count, else ``~/.local/share``); macOS uses ``~/Library/Application Support``;
    Windows uses ``%LOCALAPPDATA%`` (the data is per machine, it should not roam).
    """
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or os.environ.get("APPDATA")
        return Path(base) / APP_NAME if base else Path.home() / "AppData" / "Local" / APP_NAME
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / APP_NAME
    xdg = os.environ.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_NAME
    return Path.home() / ".local" / "share" / APP_NAME


def registry_path(home: str | Path | None = None) -> Path:
    """The registry file: ``home/registry.db`` when ``home`` is given, else
    ``$QCONV_HOME/registry.db`` when QCONV_HOME is set (and not empty), else under
    :func:`user_data_dir`. Nothing is created here."""
    if home is None:
        home = os.environ.get("QCONV_HOME") or None
    folder = Path(home).expanduser() if home is not None else user_data_dir()
    return folder / REGISTRY_FILENAME
