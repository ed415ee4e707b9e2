"""Map source records to the API's message shape.

Three cases share one path: a CSV whose headers are dotted API paths (`messageAttributes.body`)
maps with no file; a `--map` TOML file maps any CSV or JSONL whose names differ; a JSONL of
API-shaped objects passes through untouched. Values read as text are coerced to the
schema's types here; whatever cannot be coerced is left as it is, so that validation names
the field and the value in plain words.
"""

from __future__ import annotations

import functools
import json
import re
import string
import tomllib
import types
import typing
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson
from pydantic import BaseModel

from .check import is_path_segment, wire_time
from .errors import UsageError
from .models import SaveMessageRequest
from .read import RawRow, RowError, may_hold_huge_int

ID_FIELDS = ("departmentUUID", "customerUUID")
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}
_INT = re.compile(r"[+-]?\d+")


def _field_kinds() -> dict[str, str]:
    """Every dotted API path a column can name, with its kind: str, bool, int or json."""
    kinds = {name: "str" for name in ID_FIELDS}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            path = f"{prefix}{name}"
            annotation = info.annotation
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            inner = args[0] if isinstance(annotation, types.UnionType) and args else annotation
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                kinds[path] = "json"
                walk(inner, path + ".")
            elif inner is bool:
                kinds[path] = "bool"
            elif inner is int:
                kinds[path] = "int"
            elif inner is str:
                kinds[path] = "str"
            else:
                kinds[path] = "json"

    walk(SaveMessageRequest, "")
    return kinds


FIELD_KINDS = _field_kinds()
# Free-form objects: any path below them is allowed (`messageAttributes.metaData.ticket`).
_FREE = tuple(
    p + "." for p in FIELD_KINDS if p.endswith(("metaData", "value", "buttonActionEventData"))
)


def is_api_path(path: str) -> bool:
    return path in FIELD_KINDS or path.startswith(_FREE)


def coerce(path: str, value: Any) -> Any:
    """A text value turned into its field's type; left as it is when it cannot be."""
    if not isinstance(value, str):
        return value
    kind = FIELD_KINDS.get(path, "str")
    if kind == "bool":
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    elif kind == "int":
        if _INT.fullmatch(value.strip()) and -(2**63) <= (number := int(value)) < 2**63:
            return number
    elif kind == "json":
        try:
            parsed = orjson.loads(value)
        except orjson.JSONDecodeError:
            return value
        if may_hold_huge_int(value.encode()):
            # Read exactly: an integer beyond 64 bits is then rejected as NUMBER_TOO_LARGE
            # when the message is written, instead of going out altered as a float.
            try:
                return json.loads(value)
            except (ValueError, RecursionError):
                return value
        return parsed
    return value


def set_path(target: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = target
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value


def get_path(record: dict[str, Any], path: str) -> Any:
    """A column of a CSV record, or a dotted path into a JSON record."""
    if path in record:
        return record[path]
    node: Any = record
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True, slots=True)
class MapProblem:
    code: str
    description: str


def check_headers(headers: Sequence[str], source: str) -> None:
    """Headers must be API paths when there is no mapping file: say which are not."""
    unknown = [h for h in headers if not is_api_path(h)]
    if unknown:
        shown = ", ".join(repr(h) for h in unknown[:8])
        raise UsageError(
            f"{source}: column(s) {shown} are not fields of the API's message",
            hint=f"name columns by API path (messageAttributes.body), or write a mapping: "
            f"histimport map init {source} > mapping.toml, then --map mapping.toml",
        )
    _check_disjoint(headers, f"{source}: columns")


def _check_disjoint(paths: Iterable[str], what: str) -> None:
    """No path may lie inside another ("metaData" and "metaData.ref"): one value would
    silently replace the other."""
    given = set(paths)
    for path in sorted(given):
        parts = path.split(".")
        for n in range(1, len(parts)):
            outer = ".".join(parts[:n])
            if outer in given:
                raise UsageError(
                    f"{what} {outer!r} and {path!r} overlap: one would replace the other"
                )


# -- mapping files --------------------------------------------------------------------


_RULE_KEYS = {
    "column",
    "const",
    "template",
    "default",
    "strip",
    "lower",
    "upper",
    "map",
    "timestamp",
    "tz",
}


@dataclass(frozen=True)
class Rule:
    """How one API path gets its value."""

    path: str
    column: str | None = None
    const: Any = None
    template: str | None = None
    default: Any = None
    strip: bool = False
    lower: bool = False
    upper: bool = False
    values: dict[str, Any] = field(default_factory=dict)
    timestamp: str | None = None
    tz: ZoneInfo | None = None

    def columns(self) -> list[str]:
        """The columns (or paths) it reads."""
        if self.const is not None:
            return []
        if self.template is not None:
            return [name for _, name, _, _ in _TEMPLATES.parse(self.template) if name]
        return [self.column] if self.column is not None else []

    def value(self, record: dict[str, Any]) -> tuple[Any, MapProblem | None]:
        if self.const is not None:
            return self.const, None
        if self.template is not None:
            try:
                raw: Any = _TEMPLATES.vformat(self.template, (), record)
            except (ValueError, IndexError, KeyError, AttributeError, TypeError) as exc:
                return None, MapProblem("MAPPING_ERROR", f"{self.path}: template failed: {exc}")
        else:
            assert self.column is not None
            raw = get_path(record, self.column)
        if isinstance(raw, str):
            if self.strip:
                raw = raw.strip()
            if self.lower:
                raw = raw.lower()
            if self.upper:
                raw = raw.upper()
        if raw is None or raw == "":
            if self.default is None:
                return None, None
            raw = self.default  # then mapped, read as a time stamp and typed like a value
        if self.values and isinstance(raw, str | int | bool):
            key = ("true" if raw else "false") if isinstance(raw, bool) else str(raw)
            if key in self.values:
                raw = self.values[key]
        if self.timestamp is not None:
            return self._timestamp(raw)
        return coerce(self.path, raw), None

    def _timestamp(self, raw: Any) -> tuple[Any, MapProblem | None]:
        moment = parse_time(raw, self.timestamp or "iso", self.tz)
        wire = None if moment is None else wire_time(moment)
        if wire is None:
            shown = f'"{raw}"' if isinstance(raw, str) else orjson.dumps(raw).decode()
            return None, MapProblem(
                "INVALID_TIMESTAMP",
                f"{self.path}: {shown[:60]} is not a timestamp of the form {self.timestamp!r}",
            )
        return wire, None


class _Template(string.Formatter):
    """`{column}` or `{a.b}` (a dotted path into a JSON record); missing ones render empty."""

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        value = get_path(kwargs, field_name)
        return ("" if value is None else value), field_name


_TEMPLATES = _Template()


def parse_time(raw: Any, form: str, tz: tzinfo | None) -> datetime | None:
    """A time stamp in the given form ('iso', 'epoch', 'epoch_ms' or a strptime pattern);
    naive times are in `tz` (None: naive times are refused)."""
    try:
        if form in ("epoch", "epoch_ms"):
            number = float(raw)
            return datetime.fromtimestamp(number / 1000 if form == "epoch_ms" else number, UTC)
        if not isinstance(raw, str):
            return None
        text = raw.strip()
        moment = datetime.fromisoformat(text) if form == "iso" else datetime.strptime(text, form)
    except (ValueError, OverflowError, OSError, TypeError):
        return None
    if moment.tzinfo is None:
        if tz is None:
            return None
        moment = moment.replace(tzinfo=tz)
    return moment


class Mapping:
    """A `--map` file: `[fields]` with one rule per API path."""

    def __init__(self, rules: list[Rule], path: str) -> None:
        self.rules = rules
        self.path = path

    @classmethod
    def load(cls, path: Path) -> Mapping:
        try:
            data = tomllib.loads(path.read_text("utf-8"))
        except OSError as exc:
            raise UsageError(f"--map {path}: cannot read: {exc.strerror or exc}") from exc
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise UsageError(f"--map {path}: not valid TOML: {exc}") from exc
        fields = data.get("fields")
        if not isinstance(fields, dict) or not fields:
            raise UsageError(f"--map {path}: needs a [fields] table", hint="see README.md")
        rules = [_rule(str(path), target, spec) for target, spec in fields.items()]
        _check_disjoint((rule.path for rule in rules), f"--map {path}: [fields]")
        return cls(rules, str(path))

    def check_columns(self, header: Sequence[str], source: str) -> None:
        """Every column the rules read must be in a CSV source's header (unless the rule has
        a default for its absence): a misspelt one would leave a field empty in every row."""
        present = set(header)
        missing = sorted(
            {c for rule in self.rules if rule.default is None for c in rule.columns()} - present
        )
        if missing:
            raise UsageError(
                f"{source}: --map {self.path} reads column(s) "
                f"{', '.join(map(repr, missing))}, which the header does not have",
                hint=f"the header has {', '.join(map(repr, header[:12]))}"
                + (" ..." if len(header) > 12 else ""),
            )

    def apply(self, record: dict[str, Any]) -> tuple[dict[str, Any], list[MapProblem]]:
        message: dict[str, Any] = {}
        problems: list[MapProblem] = []
        for rule in self.rules:
            value, problem = rule.value(record)
            if problem is not None:
                problems.append(problem)
            elif value is not None:
                set_path(message, rule.path, value)
        return message, problems


def _rule(source: str, target: str, spec: Any) -> Rule:
    where = f"--map {source}: [fields] {target!r}"
    if not is_api_path(target):
        raise UsageError(f"{where}: is not a field of the API's message")
    if isinstance(spec, str):
        spec = {"column": spec}
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: give a column name or a table", hint='e.g. { column = "text" }')
    unknown = set(spec) - _RULE_KEYS
    if unknown:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    sources = [k for k in ("column", "const", "template") if k in spec]
    if len(sources) != 1:
        raise UsageError(f"{where}: needs exactly one of column, const or template")
    for key in ("column", "template", "timestamp", "tz"):
        if key in spec and not isinstance(spec[key], str):
            raise UsageError(f"{where}: {key} must be text, not {spec[key]!r}")
    for key in ("strip", "lower", "upper"):
        if key in spec and not isinstance(spec[key], bool):
            raise UsageError(f"{where}: {key} must be true or false")
    tz = None
    if "tz" in spec:
        try:
            tz = ZoneInfo(spec["tz"])
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise UsageError(f"{where}: unknown time zone {spec['tz']!r}") from exc
    if "template" in spec:
        _check_template(where, spec["template"])
    values = spec.get("map", {})
    if not isinstance(values, dict):
        raise UsageError(f"{where}: map must be a table of value = replacement")
    return Rule(
        path=target,
        column=spec.get("column"),
        const=spec.get("const"),
        template=spec.get("template"),
        default=spec.get("default"),
        strip=bool(spec.get("strip", False)),
        lower=bool(spec.get("lower", False)),
        upper=bool(spec.get("upper", False)),
        values={str(k): v for k, v in values.items()},
        timestamp=spec.get("timestamp"),
        tz=tz,
    )


_MAX_WIDTH = 1000


def _check_template(where: str, template: Any) -> None:
    if not isinstance(template, str):
        raise UsageError(f"{where}: template must be text")
    try:
        fields = [(f, spec) for _, f, spec, _ in _TEMPLATES.parse(template) if f is not None]
    except ValueError as exc:
        raise UsageError(f"{where}: bad template: {exc}") from exc
    if any(not n or not n.replace("_", "").replace(".", "").isalnum() for n, _ in fields):
        raise UsageError(f"{where}: template fields must be column names, e.g. '{{first}}'")
    for name, spec in fields:
        # A format spec is fixed: none taken from the data, and no width or precision that
        # would make one row's value larger than a message may be.
        if spec and ("{" in spec or any(int(n) > _MAX_WIDTH for n in re.findall(r"\d+", spec))):
            raise UsageError(
                f"{where}: the format of {{{name}:{spec}}} may not hold a field, nor a width "
                f"or precision over {_MAX_WIDTH}"
            )


# -- map init ---------------------------------------------------------------------------

_GUESSES: dict[str, Iterable[str]] = {
    "departmentUUID": ("department", "dept", "team", "queue", "group", "department_id"),
    "customerUUID": ("customer", "customer_id", "client", "client_id", "contact_id", "user_id"),
    "sourceUuid": ("id", "message_id", "msg_id", "uuid", "source_id", "ticket_id"),
    "sentOn": ("created_at", "created", "sent", "sent_at", "date", "timestamp", "time"),
    "receivedOn": ("received", "received_at", "delivered_at"),
    "messageAttributes.body": ("text", "body", "message", "content", "comment"),
    "messageAttributes.subject": ("subject", "title"),
    "messageAttributes.protocol": ("channel", "protocol", "medium", "source"),
    "messageAttributes.type": ("direction", "type"),
    "userUuid": ("agent", "agent_id", "author_id", "user"),
}


def starter_mapping(
    headers: Sequence[str], source: str, rows: Sequence[dict[str, str]] = ()
) -> str:
    """A mapping file to start from: best guesses filled in, the rest commented out. With
    `rows` (the source's first rows), the guesses are checked against the values: a
    sourceUuid from a column (or two) whose values are unique, the time stamps' format as
    the values spell it, and value maps where ids or enum-like values need them."""
    normal = {re.sub(r"[^a-z0-9]+", "_", h.lower()).strip("_"): h for h in headers}
    lines = [
        f"# Mapping for {source}: API path = source column (or a table with transforms).",
        "# Keys of a table: column | const | template, and strip, lower, upper, map,",
        '# default, timestamp ("iso", "epoch", "epoch_ms" or a strptime pattern), tz.',
    ]
    if rows:
        lines.append(f"# Checked against the first {len(rows):,} rows of the source.")
    lines += ["", "[fields]"]
    used: set[str] = set()
    for path, names in _GUESSES.items():
        found = next((normal[n] for n in names if n in normal and normal[n] not in used), None)
        if path in headers:
            found = path
        if path == "sourceUuid" and rows and path not in headers:
            lines.append(_source_uuid(headers, rows, normal, used))
            continue
        if found is None:
            lines.append(f'# {_toml_key(path)} = {{ column = "?" }}')
            continue
        used.add(found)
        values = _values(rows, found) if path in _READ_VALUES else []
        if path in ("sentOn", "receivedOn"):
            lines.append(_timestamp(path, found, values))
        elif (
            path in _IDS
            and len(wrong := [v for v in values if not is_path_segment(v)])
            > len(values) * _OUTLIERS
        ):
            wrong = list(dict.fromkeys(wrong))
            if len(wrong) > _ENUM_VALUES:
                lines.append(f'{_toml_key(path)} = "{found}"')
                lines.append(
                    f"#   {len(wrong)} values are no id (letters, digits and - . _ ~ only), "
                    f"such as {_quoted(wrong[0])}: a template or a map of the platform's ids"
                )
            else:
                lines.append(_value_map(path, found, wrong, lambda v: "?", fold=False))
                lines.append(
                    '#   "?": values that are no id (letters, digits and - . _ ~ only): '
                    "the platform's ids for them (other values pass unchanged)"
                )
        elif path in _ENUMS and 0 < len(set(values)) <= _ENUM_VALUES:
            known = _ENUMS[path]
            lines.append(_value_map(path, found, values, functools.partial(_known, known)))
            lines.append(
                f'#   "?": the platform\'s value for each (documented: '
                f"{', '.join(known)}, others unknown)"
            )
        else:
            lines.append(f'{_toml_key(path)} = "{found}"')
    rest = [h for h in headers if h not in used]
    if rest:
        lines += ["", "# Columns not mapped yet:"]
        lines += [f'# "messageAttributes.metaData.{h}" = "{h}"' for h in rest]
    return "\n".join(lines) + "\n"


_IDS = (*ID_FIELDS, "userUuid")
_ENUMS = {
    "messageAttributes.protocol": ("TEXT",),
    "messageAttributes.type": ("DRAFT",),
    "messageAttributes.purpose": ("F",),
}
"""The enum-like fields, and the values the endpoint's documentation names (one each)."""
_READ_VALUES = ("sentOn", "receivedOn", *_IDS, *_ENUMS)
"""The fields whose column's values a guess reads (the others are mapped by name alone)."""
_OUTLIERS = 0.01
"""The share of rows a guess may not fit (a repeated id, a malformed time, a bad id): the
run rejects and lists them, to be fixed in the export."""
_ENUM_VALUES = 20
"""Distinct values past which a column is no enum: left as it is."""
_TIME_FORMATS = (
    "%d/%m/%Y %H:%M",
    "%d/%m/%Y %H:%M:%S",
    "%m/%d/%Y %H:%M",
    "%m/%d/%Y %H:%M:%S",
    "%d.%m.%Y %H:%M",
    "%d.%m.%Y %H:%M:%S",
    "%d-%m-%Y %H:%M",
    "%d-%m-%Y %H:%M:%S",
    "%Y/%m/%d %H:%M:%S",
    "%Y%m%d%H%M%S",
)
"""strptime patterns tried in turn, day first before month first, for time stamps that
are not ISO 8601 nor epoch numbers."""
_PAIRED = re.compile(r"(^|_)(id|no|num|number|seq|n)$|^(id|no|seq)(_|$)")
"""Names of columns that may make a sourceUuid together (ticket_id and msg_no)."""


def _values(rows: Sequence[dict[str, str]], column: str) -> list[str]:
    return [v for row in rows if (v := str(row.get(column) or "").strip())]


def _known(known: tuple[str, ...], value: str) -> str:
    return value.upper() if value.upper() in known else "?"


def _value_map(
    path: str,
    column: str,
    values: Sequence[str],
    to: Callable[[str], str],
    *,
    fold: bool = True,
) -> str:
    """A map of the column's distinct values; with `fold`, lower-cased first when they
    differ in case alone (Mail, mail): never for ids, where case tells two apart."""
    distinct = list(dict.fromkeys(values))
    lower = fold and len({v.lower() for v in distinct}) < len(distinct)
    if lower:
        distinct = list(dict.fromkeys(v.lower() for v in distinct))
    pairs = ", ".join(f"{_quoted(v)} = {_quoted(to(v))}" for v in distinct)
    case = "lower = true, " if lower else ""
    return f'{_toml_key(path)} = {{ column = "{column}", strip = true, {case}map = {{ {pairs} }} }}'


def _quoted(text: str) -> str:
    return orjson.dumps(text).decode()


def _source_uuid(
    headers: Sequence[str],
    rows: Sequence[dict[str, str]],
    normal: dict[str, str],
    used: set[str],
) -> str:
    """sourceUuid from the first id-like column (named like one) whose values are all
    there and unique, or else from two together; or --generate-source-uuid."""

    cells: dict[str, list[str]] = {}  # by column, its values stripped, row by row

    def unique(*columns: str) -> bool:
        """All there and unique, but for a few rows in a hundred (rejected by the run,
        DUPLICATE_SOURCE_UUID or MISSING_FIELD, and listed to fix): an export's own ids
        are still its ids."""
        for c in columns:
            if c not in cells:
                cells[c] = [(row.get(c) or "").strip() for row in rows]
        together = list(zip(*(cells[c] for c in columns), strict=True))
        empty = sum(1 for values in together if not all(values))
        repeats = len(together) - len({"-".join(values) for values in together})
        return empty + repeats <= len(rows) * _OUTLIERS

    guessed = [normal[n] for n in _GUESSES["sourceUuid"] if n in normal]
    paired = [h for n, h in normal.items() if _PAIRED.search(n)]
    for column in dict.fromkeys([*guessed, *paired]):  # id-like columns only
        if unique(column):
            used.add(column)
            return f'sourceUuid = "{column}"'
    for i, first in enumerate(paired):
        for second in paired[i + 1 :]:
            if unique(first, second):
                used.update((first, second))
                return f'sourceUuid = {{ template = "{{{first}}}-{{{second}}}" }}'
    return (
        "# sourceUuid: no column, nor two id columns together, is unique in these rows: "
        "run with --generate-source-uuid"
    )


def _timestamp(path: str, column: str, values: Sequence[str]) -> str:
    """The column's time stamps, in the form their values have."""
    key = _toml_key(path)
    local = ', tz = "UTC" }  # the export\'s time zone if not UTC, e.g. tz = "Europe/Berlin"'
    if not values:
        return f'{key} = {{ column = "{column}", timestamp = "iso"{local}'
    if all(v.isdigit() for v in values):
        form = "epoch_ms" if min(len(v) for v in values) >= 12 else "epoch"
        return f'{key} = {{ column = "{column}", timestamp = "{form}" }}'
    iso = [m for v in values if (m := _iso(v)) is not None]
    if len(values) - len(iso) <= len(values) * _OUTLIERS:
        if all(m.tzinfo is not None for m in iso):
            return f'{key} = {{ column = "{column}", timestamp = "iso" }}'
        return f'{key} = {{ column = "{column}", timestamp = "iso"{local}'
    fitting = [f for f in _TIME_FORMATS if _all_parse(values, f)]
    if not fitting:
        return (
            f'{key} = {{ column = "{column}", timestamp = "?" }}  # a strptime pattern '
            f"for values such as {_quoted(_misfit(values))}"
        )
    line = f'{key} = {{ column = "{column}", timestamp = "{fitting[0]}"{local}'
    if len(fitting) > 1 and fitting[0].startswith("%d") and fitting[1].startswith("%m"):
        line += f'\n#   day or month first? "{fitting[1]}" fits these values too'
    return line


def _iso(value: str) -> datetime | None:
    """An ISO 8601 time as written, with its zone or without one; None if it is not one."""
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _parses(value: str, form: str) -> bool:
    return parse_time(value, form, UTC) is not None


def _all_parse(values: Sequence[str], form: str) -> bool:
    """Whether `form` reads the values, but for a few in a hundred (`_OUTLIERS`)."""
    misfits = 0
    for value in values:
        misfits += not _parses(value, form)
        if misfits > len(values) * _OUTLIERS:
            return False
    return True


def _misfit(values: Sequence[str]) -> str:
    """A value that no form reads: the example to write a pattern for."""
    forms = ("iso", *_TIME_FORMATS)
    return next((v for v in values if not any(_parses(v, f) for f in forms)), values[0])


def _toml_key(path: str) -> str:
    return f'"{path}"' if "." in path else path


_GENERATED = uuid.UUID("1b7e9a52-5d0c-4f7e-8f43-4a8d2c3b6e10")


class Mapper:
    """Turns one source's raw records into API-shaped rows (`None` for its header)."""

    def __init__(
        self, fmt: str, mapping: Mapping | None, source: str, *, generate_source_uuid: bool
    ) -> None:
        self.fmt = fmt
        self.mapping = mapping
        self.source = source
        self.generate_source_uuid = generate_source_uuid

    def __call__(self, row: RawRow) -> RawRow | None:
        if row.header is not None:
            if self.mapping is None:
                check_headers(row.header, self.source)
            else:
                self.mapping.check_columns(row.header, self.source)
            return None
        data = row.data
        if data is None:
            return row
        if self.mapping is not None:
            row.nulls = True  # a default or a mapped value may be null
            data, problems = self.mapping.apply(data)
            if problems:
                row.problems = [RowError(p.code, p.description) for p in problems]
        elif self.fmt == "csv":
            data = {}
            for header, value in row.data.items():  # type: ignore[union-attr]
                if value != "":  # an empty cell means absent
                    set_path(data, header, coerce(header, value))
        if self.generate_source_uuid and data.get("sourceUuid") in (None, ""):
            # Derived from the content, so that a re-run derives the same id.
            try:
                content = orjson.dumps(data, option=orjson.OPT_SORT_KEYS)
            except orjson.JSONEncodeError:
                pass  # a number beyond 64 bits: validation rejects the row and says why
            else:
                data["sourceUuid"] = str(uuid.uuid5(_GENERATED, content.decode()))
        row.data = data
        return row
