"""The command line: options -> Config -> one library call -> rendered result -> exit code.

Exit codes are decided in one place, `@_exits`, from the library's result or exception
(bad option syntax is Typer's, exit 2 as well). Every sending option also comes from
`HISTIMPORT_<NAME>` or `histimport.toml`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import getpass
import inspect
import logging
import os
import sys
import tomllib
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer

from . import __version__
from .config import Config, LogFormat, SourceFormat
from .errors import ExitStatus, HistimportError, UsageError

app = typer.Typer(
    name="histimport",
    help="Import customer-communication history through the platform's historical-import "
    "endpoint: nothing lost, nothing duplicated, nobody notified.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

CONFIG_FILE = "histimport.toml"


class OutputFormat(enum.StrEnum):
    TEXT = "text"
    JSON = "json"
    GITHUB = "github"


_INPUT, _TARGET, _DELIVERY, _OUTPUTS = "Input", "Target", "Delivery", "Outputs and logs"
"""The groups the run options are shown in by --help."""

_EXAMPLES = {
    "load": (
        "Examples:  histimport load export.jsonl.gz --base-url https://platform.example/api  ·  "
        "histimport load export.csv --map map.toml --out-dir runs  ·  "
        "histimport load export.jsonl --sandbox"
    ),
    "retry": (
        "Example:  histimport retry failed.json --base-url https://platform.example/api "
        "(with the load's --state-dir)"
    ),
    "validate": (
        "Examples:  histimport validate export.jsonl  ·  "
        "histimport validate export.csv --map map.toml --output github"
    ),
    "sandbox": ("Example:  histimport sandbox --port 8080 --rate-limit 20 --fail-rate 0.05"),
    "status": (
        "Examples:  histimport status  ·  "
        "histimport status --accepted accepted.csv  ·  "
        "histimport status --purge"
    ),
    "map init": ("Example:  histimport map init legacy.csv > legacy.map.toml"),
}
"""One example or more per command, shown at the end of its --help."""

_COMMANDS_WITH_SETTINGS = ("load", "retry", "validate")


def _env(name: str) -> str:
    return f"HISTIMPORT_{name.upper()}"


def _opt(*decls: str, help: str, env: str | None = None, **kw: Any) -> Any:
    name = env or decls[0].lstrip("-").split("/")[0].replace("-", "_")
    return typer.Option(*decls, help=help, envvar=_env(name), show_envvar=True, **kw)


# Options every sending command takes (load, retry, validate), added to their signatures by
# @_run_options, so that each is declared once.
_RUN_OPTIONS: dict[str, Any] = {
    "base_url": Annotated[
        str | None,
        _opt(
            "--base-url",
            rich_help_panel=_TARGET,
            help="Service root; the endpoint path is appended.",
        ),
    ],
    "username": Annotated[
        str | None, _opt("--username", rich_help_panel=_TARGET, help="Basic auth user.")
    ],
    "password_stdin": Annotated[
        bool,
        _opt(
            "--password-stdin",
            rich_help_panel=_TARGET,
            help="Read the password from the first line of stdin.",
        ),
    ],
    "sandbox": Annotated[
        bool,
        _opt(
            "--sandbox",
            rich_help_panel=_TARGET,
            help="Import into the bundled sandbox on a loopback port.",
        ),
    ],
    "chunk_size": Annotated[
        int, _opt("--chunk-size", rich_help_panel=_DELIVERY, help="Messages per request.")
    ],
    "max_request_bytes": Annotated[
        int,
        _opt(
            "--max-request-bytes",
            rich_help_panel=_DELIVERY,
            help="Largest request body; larger chunks are cut.",
        ),
    ],
    "concurrency": Annotated[
        int, _opt("--concurrency", rich_help_panel=_DELIVERY, help="Requests in flight at most.")
    ],
    "rate": Annotated[
        float | None, _opt("--rate", rich_help_panel=_DELIVERY, help="Requests per second at most.")
    ],
    "max_attempts": Annotated[
        int,
        _opt(
            "--max-attempts",
            rich_help_panel=_DELIVERY,
            help="Attempts per request for retryable outcomes.",
        ),
    ],
    "timeout": Annotated[
        float, _opt("--timeout", rich_help_panel=_DELIVERY, help="Seconds per request.")
    ],
    "give_up_after": Annotated[
        float,
        _opt(
            "--give-up-after",
            rich_help_panel=_DELIVERY,
            help="Seconds of nothing but connection errors, timeouts and 5xx before the run "
            "stops (exit 1; the same command resumes).",
        ),
    ],
    "callback_url": Annotated[
        str | None,
        _opt(
            "--callback-url",
            rich_help_panel=_TARGET,
            help="Sent as callBackPathUrl of every request.",
        ),
    ],
    "notify": Annotated[
        bool,
        _opt(
            "--notify/--no-notify",
            rich_help_panel=_TARGET,
            help="Let historical messages notify people.",
        ),
    ],
    "failed_out": Annotated[
        Path,
        _opt(
            "--failed-out", rich_help_panel=_OUTPUTS, help="The failed file, written on every run."
        ),
    ],
    "report": Annotated[
        Path | None,
        _opt("--report", rich_help_panel=_OUTPUTS, help="Write a JSON run report here."),
    ],
    "out_dir": Annotated[
        Path | None,
        _opt(
            "--out-dir",
            rich_help_panel=_OUTPUTS,
            help="Write the run's outputs (failed.json, report.json, accepted.jsonl) in a new "
            "folder DIR/TIME-runN of their own, instead of --failed-out, --report and "
            "--accepted-out.",
        ),
    ],
    "state_dir": Annotated[
        Path,
        _opt(
            "--state-dir",
            rich_help_panel=_DELIVERY,
            help="The run ledger (resume and de-duplication).",
        ),
    ],
    "unordered": Annotated[
        bool,
        _opt(
            "--unordered",
            rich_help_panel=_DELIVERY,
            help="Do not keep each customer's messages in order.",
        ),
    ],
    "allow_insecure_http": Annotated[
        bool,
        _opt(
            "--allow-insecure-http",
            rich_help_panel=_TARGET,
            help="Permit http:// to a non-loopback host.",
        ),
    ],
    "ca_bundle": Annotated[
        Path | None,
        _opt("--ca-bundle", rich_help_panel=_TARGET, help="PEM file of extra CAs to trust (TLS)."),
    ],
    "format": Annotated[
        SourceFormat | None,
        _opt("--format", rich_help_panel=_INPUT, help="Source format; required for stdin."),
    ],
    "delimiter": Annotated[
        str | None,
        _opt(
            "--delimiter",
            rich_help_panel=_INPUT,
            help="CSV delimiter (default: guessed from , ; tab |).",
        ),
    ],
    "encoding": Annotated[
        str | None,
        _opt(
            "--encoding",
            rich_help_panel=_INPUT,
            help="CSV text encoding (default UTF-8; BOMs detected).",
        ),
    ],
    "map_file": Annotated[
        Path | None,
        _opt(
            "--map",
            rich_help_panel=_INPUT,
            help="TOML mapping for sources whose fields are not the API's.",
            env="map",
        ),
    ],
    "generate_source_uuid": Annotated[
        bool,
        _opt(
            "--generate-source-uuid",
            rich_help_panel=_INPUT,
            help="Derive a missing sourceUuid from the row's content.",
        ),
    ],
    "strict": Annotated[
        bool, _opt("--strict", rich_help_panel=_INPUT, help="Reject rows that only have warnings.")
    ],
    "max_line_bytes": Annotated[
        int,
        _opt(
            "--max-line-bytes",
            rich_help_panel=_INPUT,
            help="Longest accepted line; longer ones are rejected.",
        ),
    ],
    "check_workers": Annotated[
        int | None,
        _opt(
            "--check-workers",
            rich_help_panel=_INPUT,
            help="Processes that parse and validate JSONL rows (default: one per CPU, at most "
            "4, on large sources; 0: none).",
        ),
    ],
    "shard": Annotated[
        str | None,
        _opt(
            "--shard",
            rich_help_panel=_INPUT,
            help="Take only shard K/N (0-based) of the customers.",
        ),
    ],
    "shards": Annotated[
        int | None,
        _opt(
            "--shards",
            rich_help_panel=_INPUT,
            help="N shards, K from JOB_COMPLETION_INDEX (validate: plan for N).",
        ),
    ],
    "quiet": Annotated[
        bool, _opt("--quiet", "-q", rich_help_panel=_OUTPUTS, help="No progress bar, no summary.")
    ],
    "log_format": Annotated[
        LogFormat,
        _opt(
            "--log-format", rich_help_panel=_OUTPUTS, help="json: one object per event on stderr."
        ),
    ],
    "progress_interval": Annotated[
        float,
        _opt(
            "--progress-interval",
            rich_help_panel=_OUTPUTS,
            help="Seconds between two progress events in the logs (--log-format json, or "
            "text off a terminal).",
        ),
    ],
}
# Defaults live in Config; the command line adds only what is not a Config field.
_DEFAULTS: dict[str, Any] = {
    **{f.name: f.default for f in dataclasses.fields(Config) if f.name in _RUN_OPTIONS},
    "password_stdin": False,
    "shard": None,
    "shards": None,
}


def _exits(func: Callable[..., int]) -> Callable[..., None]:
    """Turn a command's result or error into the process exit code: the one place where
    exceptions meet exit codes."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            if _settings_error is not None:
                raise _settings_error
            status = func(*args, **kwargs)
        except HistimportError as exc:
            _report_error(exc.message, exc.hint, as_json=kwargs.get("log_format") == "json")
            status = exc.exit_status
        except KeyboardInterrupt:
            status = ExitStatus.INTERRUPTED
        raise typer.Exit(int(status))

    return wrapper


def _run_options(func: Callable[..., int]) -> Callable[..., int]:
    """Append the shared run options to a command's signature."""
    hints = typing.get_type_hints(func, include_extras=True)
    own = [
        p.replace(annotation=hints[p.name])
        for p in inspect.signature(func).parameters.values()
        if p.kind != p.VAR_KEYWORD
    ]
    shared = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=_DEFAULTS[name], annotation=annotation
        )
        for name, annotation in _RUN_OPTIONS.items()
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        return func(*args, **kwargs)

    wrapper.__signature__ = inspect.Signature(own + shared)  # type: ignore[attr-defined]
    return wrapper


def _config(options: dict[str, Any], *, dry_run: bool = False, fresh: bool = False) -> Config:
    from .shard import parse_shard, shard_suffix

    password = None if dry_run or options["sandbox"] else _password(options["password_stdin"])
    username = options["username"]
    if not dry_run and not options["sandbox"] and (username is None or password is None):
        raise UsageError(
            "no credentials",
            hint="set HISTIMPORT_USERNAME (or --username) and HISTIMPORT_PASSWORD "
            "(or --password-stdin), or use --sandbox",
        )
    fields = {k: v for k, v in options.items() if k not in ("password_stdin", "shard", "shards")}
    shard = None
    if not dry_run or options["shard"] is not None:
        shard = parse_shard(options["shard"], options["shards"])
    if shard is not None:
        # Each shard keeps its own ledger and failed file unless told otherwise.
        suffix = shard_suffix(shard)
        if fields["failed_out"] == _DEFAULTS["failed_out"]:
            fields["failed_out"] = Path(f"failed.{suffix}.json")
        if fields["state_dir"] == _DEFAULTS["state_dir"]:
            fields["state_dir"] = Path(f".histimport-{suffix}")
    return Config(**fields, password=password, dry_run=dry_run, fresh=fresh, shard=shard)


def _password(from_stdin: bool) -> str | None:

    if from_stdin:
        line = sys.stdin.readline()
        if not line:
            raise UsageError("--password-stdin: stdin was empty")
        return line.rstrip("\r\n")
    if os.environ.get("HISTIMPORT_PASSWORD"):
        return os.environ["HISTIMPORT_PASSWORD"]
    if sys.stdin.isatty() and sys.stderr.isatty():
        return getpass.getpass("password: ")
    return None


_ACCEPTED_OUT = _opt(
    "--accepted-out",
    rich_help_panel=_OUTPUTS,
    help="Write one line per message accepted in this run: sourceUuid, messageUuid, "
    "departmentUUID, customerUUID (JSONL, or CSV if the name ends in .csv).",
)
_SOURCES = typer.Argument(help="JSONL or CSV files (.gz too), or - .", metavar="SOURCE")


def _finish(result: Any, display: Any, title: str) -> int:
    display.summary(result, title=title)
    return int(result.exit_status)


def _display(config: Config, *, quiet: bool | None = None) -> Any:
    from .display import Display

    return Display(
        quiet=config.quiet if quiet is None else quiet,
        log_format=config.log_format,
        progress_interval=config.progress_interval,
    )


@app.command(epilog=_EXAMPLES["load"])
@_exits
@_run_options
def load(
    sources: Annotated[list[str], _SOURCES],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Validate only: send nothing.")
    ] = False,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh", help="Start over instead of resuming (accepted messages still skipped)."
        ),
    ] = False,
    accepted_out: Annotated[Path | None, _ACCEPTED_OUT] = None,
    **options: Any,
) -> int:
    """Read, validate, send; write the failed file (and the report)."""
    from . import intake, run

    if "-" in sources and options["password_stdin"]:
        raise UsageError("stdin cannot carry both a source and the password")
    # Checked here too, so that a missing file is said before a password is asked for.
    intake.open_sources(sources, options["format"])
    config = _config({**options, "accepted_out": accepted_out}, dry_run=dry_run, fresh=fresh)
    display = _display(config)
    result = (run.validate if dry_run else run.load)(sources, config, observer=display)
    return _finish(result, display, "validate" if dry_run else "load")


@app.command(epilog=_EXAMPLES["retry"])
@_exits
@_run_options
def retry(
    failed_files: Annotated[
        list[Path], typer.Argument(help="One or more failed files.", metavar="FAILED_JSON")
    ],
    include_permanent: Annotated[
        bool,
        typer.Option(
            "--include-permanent", help="Also re-send messages the platform refused outright."
        ),
    ] = False,
    accepted_out: Annotated[Path | None, _ACCEPTED_OUT] = None,
    **options: Any,
) -> int:
    """Re-send exactly what the failed files list as retryable, unsent or rejected."""
    from .resend import retry as retry_run

    config = _config({**options, "accepted_out": accepted_out})
    display = _display(config)
    result = retry_run(failed_files, config, include_permanent=include_permanent, observer=display)
    return _finish(result, display, "retry")


@app.command(epilog=_EXAMPLES["validate"])
@_exits
@_run_options
def validate(
    ctx: typer.Context,
    sources: Annotated[list[str], _SOURCES],
    output: Annotated[
        OutputFormat,
        typer.Option("--output", help="json: one document on stdout; github: annotations."),
    ] = OutputFormat.TEXT,
    **options: Any,
) -> int:
    """Check sources offline, for CI: no network, no credentials (= load --dry-run).

    It writes a failed file only when --failed-out on its command line asks for one:
    checking an export never replaces the failed file a load wrote (whose name
    HISTIMPORT_FAILED_OUT or histimport.toml may give for every command)."""
    import tempfile

    from . import run
    from .outputs import render_validation

    source = ctx.get_parameter_source("failed_out")
    asked = source is not None and source.name == "COMMANDLINE"
    with tempfile.TemporaryDirectory(prefix="histimport-validate-") as scratch:
        if not asked:
            options = {**options, "failed_out": Path(scratch) / "failed.json"}
        config = _config(options, dry_run=True)
        display = _display(config, quiet=config.quiet or output != "text")
        result = run.validate(sources, config, observer=display)
        if output != "text":
            sys.stdout.write(render_validation(result, output, shards=options["shards"]))
            return int(result.exit_status)
    if not asked:
        result = dataclasses.replace(result, failed_path=None)
    return _finish(result, display, "validate")


class _RateWindow(enum.StrEnum):
    """The sandbox's limiter shapes (`sandbox.limits.LimiterShape`), named here so that the
    command line does not import the sandbox until it runs."""

    BUCKET = "bucket"
    FIXED = "fixed"


@app.command(epilog=_EXAMPLES["sandbox"])
@_exits
def sandbox(
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to bind (0: any free one).")] = 8080,
    db: Annotated[
        Path | None, typer.Option("--db", help="SQLite file for stored messages.")
    ] = None,
    username: Annotated[
        str | None, typer.Option("--username", help="Require this Basic auth user.")
    ] = None,
    fail_rate: Annotated[
        float, typer.Option("--fail-rate", help="Share of requests answered 503.")
    ] = 0.0,
    reject_rate: Annotated[
        float, typer.Option("--reject-rate", help="Share of messages refused individually.")
    ] = 0.0,
    rate_limit: Annotated[
        float | None, typer.Option("--rate-limit", help="Requests per second, then 429.")
    ] = None,
    rate_window: Annotated[
        _RateWindow,
        typer.Option(
            "--rate-window", help="The limiter: a token bucket, or a fixed window per second."
        ),
    ] = _RateWindow.BUCKET,
    rate_burst: Annotated[
        float | None,
        typer.Option("--rate-burst", help="The token bucket's burst (default: --rate-limit)."),
    ] = None,
    retry_after_429: Annotated[
        bool,
        typer.Option(
            "--retry-after-429/--no-retry-after", help="Whether a 429 carries Retry-After."
        ),
    ] = True,
    latency: Annotated[float, typer.Option("--latency", help="Milliseconds per answer.")] = 0.0,
    max_request_bytes: Annotated[
        int | None, typer.Option("--max-request-bytes", help="Larger bodies get 413.")
    ] = None,
    error_after_store_rate: Annotated[
        float,
        typer.Option("--error-after-store-rate", help="Share answered 500 after storing."),
    ] = 0.0,
    garble_rate: Annotated[
        float, typer.Option("--garble-rate", help="Share answered 200 with a non-JSON body.")
    ] = 0.0,
    retry_after: Annotated[
        float | None, typer.Option("--retry-after", help="Retry-After seconds sent with 503.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the injected faults.")] = 0,
    departments: Annotated[
        str | None,
        typer.Option("--departments", help="Comma-separated departments that exist (else 404)."),
    ] = None,
    journal: Annotated[
        Path | None, typer.Option("--journal", help="Append every request received here.")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="Serve https with this PEM certificate.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="The certificate's PEM key.")
    ] = None,
) -> int:
    """Serve the bundled sandbox API on loopback (demos, tests, rehearsals).

    With --username, the password is read from HISTIMPORT_SANDBOX_PASSWORD."""

    from .sandbox import SandboxConfig, serve
    from .sandbox.limits import LimiterShape

    password = os.environ.get("HISTIMPORT_SANDBOX_PASSWORD") if username else None
    if username and not password:
        raise UsageError("--username needs HISTIMPORT_SANDBOX_PASSWORD")
    config = SandboxConfig(
        host=host,
        port=port,
        db=db,
        username=username,
        password=password,
        fail_rate=fail_rate,
        reject_rate=reject_rate,
        rate_limit=rate_limit,
        rate_window=LimiterShape(rate_window.value),
        rate_burst=rate_burst,
        rate_retry_after=retry_after_429,
        latency_ms=latency,
        max_request_bytes=max_request_bytes,
        seed=seed,
        error_after_store_rate=error_after_store_rate,
        garble_rate=garble_rate,
        retry_after=retry_after,
        journal=journal,
        departments=frozenset(departments.split(",")) if departments else None,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    from .signals import sigterm_as_interrupt

    with sigterm_as_interrupt():
        serve(config, on_ready=lambda url: print(f"sandbox: serving {url}", file=sys.stderr))
    return 0


@app.command(epilog=_EXAMPLES["status"])
@_exits
def status(
    state_dirs: Annotated[
        list[Path] | None,
        typer.Option("--state-dir", help="A state dir; repeat it for several (shards)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document.")] = False,
    purge: Annotated[
        bool, typer.Option("--purge", help="Delete the state dir after a finished import.")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="With --purge: even if unfinished.")] = (
        False
    ),
    accepted: Annotated[
        Path | None,
        typer.Option(
            "--accepted",
            help="Write every message the ledger knows as accepted, one line each: "
            "sourceUuid, messageUuid, departmentUUID, customerUUID, target (JSONL, or CSV if "
            "the name ends in .csv).",
        ),
    ] = None,
) -> int:
    """What the state ledger knows: runs, sources, counts per state, frequent errors."""
    from . import status as ledger_status
    from .display import render_status

    dirs = state_dirs or [Path(".histimport")]
    if accepted is not None:
        written = ledger_status.export_accepted(dirs, accepted)
        print(f"{accepted}: {written} accepted messages", file=sys.stderr)
        return 0
    if purge:
        for state_dir in dirs:
            if ledger_status.purge(state_dir, force=force):
                print(f"deleted {state_dir}", file=sys.stderr)
            else:
                print(
                    f"deleted the state files in {state_dir}; kept the directory, which holds "
                    "other files",
                    file=sys.stderr,
                )
        return 0
    summaries = [ledger_status.status(d) for d in dirs]
    if as_json:
        document = summaries[0] if len(summaries) == 1 else {"stateDirs": summaries}
        sys.stdout.write(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        render_status(summaries)
    return 0


map_app = typer.Typer(help="Mapping files for sources whose fields are not the API's.")
app.add_typer(map_app, name="map")


@map_app.command("init", epilog=_EXAMPLES["map init"])
@_exits
def map_init(
    source: Annotated[str, typer.Argument(help="A CSV or JSONL source.", metavar="SOURCE")],
    format: Annotated[
        str | None, typer.Option("--format", help="Source format (jsonl or csv).")
    ] = None,
    delimiter: Annotated[str | None, typer.Option("--delimiter", help="CSV delimiter.")] = None,
    encoding: Annotated[str | None, typer.Option("--encoding", help="CSV encoding.")] = None,
) -> int:
    """Print a starter mapping file from a source's headers (or first JSONL object)."""
    from .intake import source_sample
    from .mapping import starter_mapping

    fields, rows = source_sample(source, format, delimiter=delimiter, encoding=encoding)
    sys.stdout.write(starter_mapping(fields, source, rows))
    return 0


def _version(value: bool) -> None:
    if value:
        print(f"histimport {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="HISTIMPORT_CONFIG",
            show_envvar=True,
            help=f"Settings file (TOML; default: ./{CONFIG_FILE} if there is one).",
        ),
    ] = None,
) -> None:
    """Import customer-communication history: load, retry, validate, sandbox."""
    # Read here, before a command's options are, so that histimport.toml applies however
    # the app is invoked. An error in them is told when the command runs: a command's
    # --help shows what it would do whatever the settings say.
    global _settings_error
    _settings_error = None
    try:
        if config is not None and not config.is_file():
            raise UsageError(f"--config {config}: no such file", hint="name a TOML settings file")
        path = config or Path(CONFIG_FILE)
        settings = _settings(path, _option_names(ctx), ctx.invoked_subcommand)
        ctx.default_map = {**settings, **(ctx.default_map or {})}
    except HistimportError as exc:
        _settings_error = exc


_settings_error: HistimportError | None = None
"""What is wrong with the settings, raised by the command about to run (`_exits`)."""


_Options = dict[str, tuple[str, bool, type | None]]
"""A command's settings: option name (`chunk-size`, `no-notify`) -> (its parameter, whether
the value is flipped: `no-notify = true` is `notify = false`, the type its value must have
in TOML: bool, int, float or str; None for a list)."""
_TOML_TYPES: dict[type, tuple[type | tuple[type, ...], str]] = {
    bool: (bool, "true or false"),
    int: (int, "an integer"),
    float: ((int, float), "a number"),
    str: (str, "a string"),
    Path: (str, "a string"),
}


def _option_names(ctx: typer.Context) -> dict[str, _Options]:
    """The options of each command that takes settings (arguments are none)."""
    commands = getattr(ctx.command, "commands", {})
    found: dict[str, _Options] = {}
    for name in _COMMANDS_WITH_SETTINGS:
        if name not in commands:
            continue
        options: _Options = {}
        signature = inspect.signature(commands[name].callback)
        for param in commands[name].params:
            if param.param_type_name != "option" or not param.name:
                continue
            kind = _value_type(signature.parameters[param.name].annotation)
            options[param.name.replace("_", "-")] = (param.name, False, kind)
            for opt in param.opts:
                options[opt.lstrip("-")] = (param.name, False, kind)
            for opt in param.secondary_opts:
                options[opt.lstrip("-")] = (param.name, True, kind)
        found[name] = options
    return found


def _value_type(annotation: Any) -> type | None:
    """The plain type of an option's value, from `Annotated[int | None, ...]`: int."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return kinds[0] if len(kinds) == 1 and kinds[0] in _TOML_TYPES else None


def _settings(path: Path, commands: dict[str, _Options], invoked: str | None) -> dict[str, Any]:
    """histimport.toml: top-level keys apply to every command, [load] etc. to one. For a
    command that takes settings, a key that is none of its options (a typo) is an error, not
    a setting silently left out; a top-level key must be an option of one of them."""
    if not path.is_file():
        return {}
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: {exc}") from exc
    if "password" in data or any("password" in v for v in data.values() if isinstance(v, dict)):
        raise UsageError(f"{path}: holds a password", hint="use HISTIMPORT_PASSWORD instead")
    if invoked not in commands:
        return {}  # status, sandbox, map: no settings to apply, none to check
    hint = "keys are option names without the leading --, e.g. chunk-size"
    every: _Options = {}
    for options in commands.values():
        every.update(options)
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in commands:
                raise UsageError(
                    f"{path}: [{key}] is not a command that takes settings",
                    hint=f"tables are {', '.join(f'[{c}]' for c in commands)}",
                )
        elif key.replace("_", "-") not in every:
            raise UsageError(f"{path}: {key}: is not an option of any command", hint=hint)
    for command, its_options in commands.items():  # every table, whichever command runs
        for key in data.get(command, {}):
            if key.replace("_", "-") not in its_options:
                raise UsageError(
                    f"{path}: [{command}] {key}: is not an option of {command}", hint=hint
                )
    options = commands[invoked]
    table = data.get(invoked, {})
    settings: dict[str, Any] = {}
    for where, key, value in [
        *(("", k, v) for k, v in data.items() if not isinstance(v, dict)),
        *((f"[{invoked}] ", k, v) for k, v in table.items()),
    ]:
        known = options.get(key.replace("_", "-"))
        if known is None:
            continue  # a top-level option of another command
        name, flipped, kind = known
        if kind is not None:
            # As TOML types it: "8" is no number, and `no-notify = "yes"` no yes or no.
            wanted, says = _TOML_TYPES[kind]
            if not isinstance(value, wanted) or (kind is not bool and isinstance(value, bool)):
                raise UsageError(f"{path}: {where}{key}: must be {says}, not {value!r}")
        settings[name] = (not value) if flipped else value
    return {invoked: settings}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `histimport` command."""
    from . import unsupported

    why = unsupported()
    harmless = {"--version", "--help", "--install-completion", "--show-completion"}
    if why is not None and not harmless & set(argv or sys.argv[1:]):
        _report_error(why, None)
        raise SystemExit(ExitStatus.USAGE)
    app(args=argv, prog_name="histimport")


def _report_error(message: str, hint: str | None, *, as_json: bool = False) -> None:
    if as_json:
        from . import logs

        logs.configure("json")
        logs.event("error", logging.ERROR, message=message, hint=hint)
        return
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"  hint: {hint}", file=sys.stderr)
