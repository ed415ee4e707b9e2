"""histimport: import customer-communication history through the platform's historical-import
endpoint — nothing lost, nothing duplicated, nobody notified.

    import histimport
    result = histimport.load(["export.jsonl"], histimport.Config(base_url=..., ...))

Heavy modules are imported on first use, so that `histimport --help` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

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

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
