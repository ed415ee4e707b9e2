"""The run's written outputs: the failed file and the report, both written atomically.

Neither ever holds a credential or a message body: identifiers, locations and errors only.
"""

from __future__ import annotations

import csv
import io
import os
import stat
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from . import logs
from .errors import OutputError, UsageError
from .read import UNREADABLE, Source
from .records import Failure

FAILED_FORMAT = "histimport.failed/v1"
REPORT_FORMAT = "histimport.report/v1"
NOT_READ = "NOT_READ"
"""The error code of the entry that stands for a source's rest, not read: the run stopped."""
_NOT_SENT = {
    "errorCode": "NOT_SENT",
    "errorDescription": "the run stopped before this message was sent or confirmed",
}


def check_writable(path: Path, option: str) -> None:
    """Fail before anything is read or sent if an output cannot be written where asked:
    finding out at the end of an import would be too late. An output is a regular file,
    written beside and renamed over: not a pipe or a device (nor a name of one, such as
    /dev/stdout), which would be replaced; through a symlink, the file it names."""
    if str(path).startswith(("/dev/", "/proc/")):
        raise UsageError(
            f"{option} {path}: names a device or a file descriptor, not a file",
            hint="name a file",
        )
    real = Path(os.path.realpath(path))
    if real.is_dir():
        raise UsageError(f"{option} {path}: is a directory", hint="name a file")
    if real.exists() and not real.is_file():
        raise UsageError(
            f"{option} {path}: is not a regular file (a pipe or a device)", hint="name a file"
        )
    parent = real.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # created when the output is written
    if not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{option} {path}: {parent} is not writable")


@contextmanager
def writing(path: Path, option: str) -> Iterator[None]:
    """An output written at the end of a run: an OSError (a full disk) is an OutputError."""
    try:
        yield
    except OSError as exc:
        raise OutputError(
            f"{option} {path} could not be written: {exc.strerror or exc}",
            hint="the outcomes are in the state dir: run the same command again to write it "
            "(nothing accepted is sent again)",
        ) from exc


def check_outputs(outputs: dict[str, Path], sources: Iterable[Source]) -> None:
    """Each output (by its option) can be written, and none over a source of the run or
    over another output."""
    for option, path in outputs.items():
        check_writable(path, option)
    taken: dict[tuple[int, int], str] = {}
    for source in sources:
        with suppress(OSError):
            # stdin too: it may be a file redirected to it (< export.jsonl).
            found = os.fstat(0) if source.is_stdin else os.stat(source.path)
            if stat.S_ISREG(found.st_mode):
                taken[found.st_dev, found.st_ino] = f"the source {source.path}"
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        with suppress(OSError):
            info = os.stat(path)
            if (info.st_dev, info.st_ino) in taken:
                raise UsageError(
                    f"{option} {path}: is {taken[info.st_dev, info.st_ino]}",
                    hint="name another file: it would be written over",
                )
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{option} {path}: is also {seen[real]}", hint="name another file")
        seen[real] = f"the {option}"


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """Write to a temporary file beside `path`, then rename it over `path`; through a
    symlink, over the file it names (the link stays)."""
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def source_entry(source: Source) -> dict[str, Any]:
    return {
        "path": source.path,
        "format": source.format,
        "sha256": source.sha256,
        "map": source.map,
    }


class FailedSource(BaseModel):
    model_config = ConfigDict(defer_build=True)

    path: str
    format: str | None = None
    sha256: str | None = None
    map: str | None = None


class FailedEntry(BaseModel):
    model_config = ConfigDict(defer_build=True)

    sourceUuid: str | None = None
    departmentUUID: str | None = None
    customerUUID: str | None = None
    source: str
    line: int
    stage: Literal["rejected", "failed", "notSent"]
    retryable: bool = False
    httpStatus: int | None = None
    errors: list[dict[str, Any]] = []
    shard: str | None = None
    """On a NOT_READ or UNREADABLE entry of a run that read one shard's rows (K/N) of its
    source: the rest of the source is that shard's rows only."""


class FailedFile(BaseModel):
    """A failed file as `retry` reads it: checked, since people edit them."""

    model_config = ConfigDict(defer_build=True)

    format: Literal["histimport.failed/v1"]
    createdAt: str | None = None
    baseUrl: str | None = None
    sources: list[FailedSource]
    failures: list[FailedEntry]


def owner(command: str, state_dir: Path | None) -> dict[str, Any]:
    """Who writes a failed file: the command, and the state dir of the import it belongs
    to (None for a check, which has none)."""
    return {
        "command": command,
        "stateDir": None if state_dir is None else os.path.realpath(state_dir),
    }


def check_not_anothers(path: Path, mine: dict[str, Any]) -> None:
    """A failed file already at `path` that another import (another state dir) wrote is
    not replaced: it is what `retry` needs. One that lists nothing, a check's (`validate`,
    `load --dry-run`: run it again), one an earlier version wrote (no owner in it), or a
    file that is no failed file is."""
    try:
        with path.open("rb") as f:
            head = f.read(64 * 1024)
    except OSError:
        return  # none there, or unreadable: its writing says what is wrong
    found = _failed_head(head)
    if found is None or found.get("format") != FAILED_FORMAT:
        return
    if "stateDir" not in found or not any((found.get("counts") or {}).values()):
        return  # an earlier version's, or one that lists nothing: nothing is lost
    theirs = found.get("stateDir")
    if theirs is None or theirs == mine["stateDir"]:
        return  # a check's (run it again), or this import's own
    what = f"the import of state dir {theirs}"
    raise UsageError(
        f"--failed-out {path}: holds the failures of {what}, "
        f"written by {found.get('command')} at {found.get('createdAt')}; it is not replaced",
        hint="name another file with --failed-out, give each run a folder of its own with "
        "--out-dir DIR, or delete the file if it is no longer needed",
    )


def _failed_head(head: bytes) -> dict[str, Any] | None:
    """The fields of a failed file's head that say who wrote it and what it lists, read
    from its first bytes, before its sources; None for a file that is no failed file."""
    if not head.startswith(b'{"format":'):
        return None
    try:  # the fields before the sources, as `write_failed` puts them
        found = orjson.loads(head.split(b',"sources":', 1)[0] + b"}")
    except orjson.JSONDecodeError:
        return {}
    return found if isinstance(found, dict) else {}


def read_failed_file(path: Path) -> FailedFile:
    from .errors import UsageError

    try:
        return FailedFile.model_validate_json(path.read_bytes())
    except OSError as exc:
        raise UsageError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UsageError(
            f"{path}: is not a failed file ({where}: {first['msg']})",
            hint="retry takes the failed.json a run wrote",
        ) from exc


def write_failed(
    path: Path,
    *,
    base_url: str | None,
    sources: list[Source],
    counts: dict[str, int],
    failures: Iterable[Failure],
    error_codes: Counter[str],
    preview: list[str],
    carried: Sequence[FailedEntry] = (),
    preview_size: int = 20,
    shards: dict[int, str] | None = None,
    owner: dict[str, Any] | None = None,
) -> None:
    """Stream every failure into the failed file; tally error codes and keep a short preview
    of the rejected rows for the summary on the way. `carried` entries (those of an earlier
    failed file that a retry did not send) are listed again as they were, and counted in
    the file's counts (which count its entries), not in the tally (the run's own rows, as
    the report's counts). `shards`: by source index, the shard (K/N) whose rows alone
    were read of it, which an UNREADABLE entry records (the rest of its source is that
    shard's rows only)."""
    counts = dict(counts)
    for kept in carried:
        counts[kept.stage] += 1
    head = {
        "format": FAILED_FORMAT,
        "createdAt": logs.timestamp(),
        # Who wrote it and what it lists, before the sources (a run may have thousands):
        # the next run reads them from the file's start (`check_not_anothers`).
        **(owner or {}),
        "counts": {k: counts[k] for k in ("rejected", "failed", "notSent")},
        "baseUrl": base_url,
        "sources": [source_entry(s) for s in sources],
    }
    with atomic_writer(path) as out:
        out.write(orjson.dumps(head)[:-1] + b',"failures":[')
        written = 0
        for failure in failures:
            errors = failure.errors or ([_NOT_SENT] if failure.stage == "notSent" else [])
            for error in errors:
                error_codes[str(error.get("errorCode"))] += 1
            source = sources[failure.source].path
            if len(preview) < preview_size and failure.stage != "notSent":
                reason = "; ".join(
                    str(e.get("errorDescription", e.get("errorCode"))) for e in errors
                )
                preview.append(f"{source}:{failure.line}: {failure.stage}: {reason}")
            entry = {
                "sourceUuid": failure.source_uuid,
                "departmentUUID": failure.department,
                "customerUUID": failure.customer,
                "source": source,
                "line": failure.line,
                "stage": failure.stage,
                "retryable": failure.retryable,
                "httpStatus": failure.http_status,
                "errors": errors,
            }
            shard = shards.get(failure.source) if shards else None
            if shard is not None and failure.source_uuid is None and has_error(errors, UNREADABLE):
                entry["shard"] = shard
            out.write((b",\n" if written else b"\n") + orjson.dumps(entry))
            written += 1
        for kept in carried:
            entry_json = kept.model_dump_json(exclude=None if kept.shard else {"shard"})
            out.write((b",\n" if written else b"\n") + entry_json.encode())
            written += 1
        out.write(b"\n]}\n")


ACCEPTED_FIELDS = ("sourceUuid", "messageUuid", "departmentUUID", "customerUUID")
"""The columns of an accepted file, in order."""


def write_accepted(
    path: Path, rows: Iterable[tuple[str | None, ...]], *, extra: tuple[str, ...] = ()
) -> int:
    """One line per accepted message (`ACCEPTED_FIELDS`, then `extra`): JSONL, or CSV when
    the name ends in `.csv`, its cells made safe from spreadsheet formulas. The number of
    lines."""
    fields = ACCEPTED_FIELDS + extra
    written = 0
    with atomic_writer(path) as out:
        if path.suffix.lower() == ".csv":
            text = io.TextIOWrapper(out, encoding="utf-8", newline="")
            writer = csv.writer(text)
            writer.writerow(fields)
            for row in rows:
                writer.writerow([formula_safe(cell) for cell in row])
                written += 1
            text.flush()
            text.detach()
        else:
            for row in rows:
                out.write(orjson.dumps(dict(zip(fields, row, strict=True))) + b"\n")
                written += 1
    return written


def formula_safe(cell: str | None) -> str:
    """A CSV cell a spreadsheet shows as text: one that begins with = + - @ (or a tab or a
    carriage return) gets a leading apostrophe."""
    if cell is None:
        return ""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def has_error(errors: Iterable[dict[str, Any]], *codes: str) -> bool:
    """Whether one of these errors (the contract's shape) has one of these codes."""
    return any(e.get("errorCode") in codes for e in errors)


def write_report(path: Path, report: dict[str, Any]) -> None:
    with atomic_writer(path) as out:
        out.write(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")


def render_validation(result: Any, output: str, *, shards: int | None = None) -> str:
    """`validate --output json|github`: one JSON document, or GitHub Actions annotations."""
    assert result.failed_path is not None  # validate writes one, to a scratch file if need be
    failures = orjson.loads(Path(result.failed_path).read_bytes())["failures"]
    if output == "github":
        lines = []
        for f in failures:
            reason = "; ".join(
                str(e.get("errorDescription") or e.get("errorCode")) for e in f["errors"]
            )
            lines.append(
                f"::error file={_escape(f['source'], True)},line={f['line']}::{_escape(reason)}"
            )
        for w in result.warnings:
            lines.append(
                f"::warning file={_escape(w['source'], True)},line={w['line']}::"
                f"{_escape(w['warningDescription'])}"
            )
        return "".join(line + "\n" for line in lines)
    document = {
        "format": "histimport.validation/v1",
        "valid": result.exit_status == 0,
        "counts": {k: result.report[k] for k in ("read", "rejected", "alreadyAccepted")},
        "rejected": [
            {
                k: f[k]
                for k in (
                    "source",
                    "line",
                    "sourceUuid",
                    "departmentUUID",
                    "customerUUID",
                    "errors",
                )
            }
            for f in failures
        ],
        "warnings": result.warnings,
        "warningCount": result.report["warnings"],
        "plan": {
            "requests": sum(p["requests"] for p in result.plan),
            "messages": sum(p["messages"] for p in result.plan),
            "customers": result.plan,
        },
    }
    if shards:
        document["shards"] = _per_shard(result.plan, shards)
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n"


def _escape(text: str, prop: bool = False) -> str:
    """GitHub workflow-command escaping (properties also escape ':' and ',')."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def _per_shard(plan: list[dict[str, Any]], shards: int) -> list[dict[str, int]]:
    """Messages and requests per shard, to see the balance before launching N copies."""
    from .shard import shard_of

    totals = [{"shard": k, "customers": 0, "messages": 0, "requests": 0} for k in range(shards)]
    for entry in plan:
        slot = totals[shard_of(entry["departmentUUID"], entry["customerUUID"], shards)]
        slot["customers"] += 1
        slot["messages"] += entry["messages"]
        slot["requests"] += entry["requests"]
    return totals
