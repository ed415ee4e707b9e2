"""histimport: import customer-communication history through the platform's historical-import
endpoint — nothing lost, nothing duplicated, nobody notified.

    import histimport
    result = histimport.load(["export.jsonl"], histimport.Config(base_url=..., ...))

Heavy modules are imported on first use, so that `histimport --help` starts fast.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"


def unsupported() -> str | None:
    """Why this platform cannot run an import, or None. The state dir's lock (fcntl), the
    check workers (fork) and the spill's hole punching are POSIX's."""
    if sys.platform.startswith("win"):
        return (
            "histimport runs on Linux and macOS, not on Windows: use WSL, or the container "
            "image (see README.md, Install)"
        )
    return None


if TYPE_CHECKING:
    from .accounting import RunResult
    from .config import Config
    from .errors import ExitStatus, HistimportError
    from .resend import retry
    from .run import load, validate

__all__ = [
    "Config",
    "ExitStatus",
    "HistimportError",
    "RunResult",
    "__version__",
    "load",
    "retry",
    "validate",
]

_LAZY = {
    "Config": "config",
    "ExitStatus": "errors",
    "HistimportError": "errors",
    "RunResult": "accounting",
    "load": "run",
    "retry": "resend",
    "validate": "run",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        if _LAZY[name] in ("run", "resend") and (why := unsupported()) is not None:
            raise ImportError(why)

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
