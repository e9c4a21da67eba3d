"""Learning from served traffic (`hyprjax serve --learn NAME`): the interaction store, versions on
disk, training rounds and the learner that ties them to the server. See docs/learn.md."""

from __future__ import annotations

import os
from pathlib import Path


def default_db() -> Path:
    """`$HYPRJAX_DATA_DIR/learn/learn.db`, else under `$XDG_DATA_HOME/hyprjax` (`~/.local/share/hyprjax`)."""
    root = os.environ.get("HYPRJAX_DATA_DIR") or Path(os.environ.get("XDG_DATA_HOME") or "~/.local/share") / "hyprjax"
    return Path(root).expanduser() / "learn" / "learn.db"
