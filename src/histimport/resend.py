"""`retry`: re-send what failed files list, and keep listing what it does not send."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from .accounting import RunResult
from .config import Config
from .matching import select
from .run import Observer, Run


def retry(
    failed_files: Sequence[str | os.PathLike[str]],
    config: Config | None = None,
    *,
    include_permanent: bool = False,
    observer: Observer | None = None,
) -> RunResult:
    """Re-send what one or more failed files list: retryable failures, unsent messages and
    rejected rows (re-read, as the user may have fixed them); with `include_permanent`,
    also the messages the platform refused."""
    cfg = config or Config()
    wanted = select(failed_files, include_permanent=include_permanent)
    if cfg.base_url is None and not cfg.sandbox and wanted.base_url is not None:
        cfg = replace(cfg, base_url=wanted.base_url)
    if cfg.map_file is None and len(wanted.maps) == 1:
        cfg = replace(cfg, map_file=Path(wanted.maps.pop()))  # the mapping the failed run used
    run = Run(cfg, observer, wanted.selection, include_permanent=include_permanent)
    return run.execute(wanted.paths, "retry", wanted.formats)
