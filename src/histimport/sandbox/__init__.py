"""The bundled sandbox: a local stand-in for the historical-import endpoint.

It stores what it is sent in SQLite, answers in the vendor's shape, and can inject the
faults a real service shows (503, 500 after storing, garbled 200, 429, 413, rejections),
reproducibly from a seed. Used by ``histimport sandbox``, ``--sandbox`` and the tests.
"""

from .app import SandboxApp
from .config import SandboxConfig, SandboxConfigError
from .server import RunningSandbox, SandboxError, sandbox, serve, start_sandbox
from .store import Outcome, SandboxStore, SaveResult, StoredMessage

__all__ = [
    "Outcome",
    "RunningSandbox",
    "SandboxApp",
    "SandboxConfig",
    "SandboxConfigError",
    "SandboxError",
    "SandboxStore",
    "SaveResult",
    "StoredMessage",
    "sandbox",
    "serve",
    "start_sandbox",
]
