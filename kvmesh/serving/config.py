"""Command-line flags that also read `KVMESH_*` environment variables.

Every long option `--foo-bar` takes its default from `KVMESH_FOO_BAR` when that is set (a flag on
the command line still wins), so the same image runs under docker-compose, Kubernetes or a shell.
"""

from __future__ import annotations

import argparse
import logging
import os

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_name(option: str) -> str:
    return "KVMESH_" + option.lstrip("-").upper().replace("-", "_")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help that shows each option's default (when it has one) and keeps descriptions as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        return f"{text} (default: {shown})" if shown not in ("", []) else text


class EnvArgumentParser(argparse.ArgumentParser):
    """argparse with KVMESH_* environment defaults for every long option, and defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        longs = [a for a in args if isinstance(a, str) and a.startswith("--")]
        if longs and kwargs.get("action") not in ("help", "version"):
            name = env_name(longs[0])
            raw = os.environ.get(name)
            if raw is not None:
                kwargs["default"] = self._parse_env(name, raw, kwargs)
                kwargs["required"] = False  # the variable supplies a required option (containers)
            if kwargs.get("help") is not argparse.SUPPRESS:
                kwargs["help"] = f"{kwargs.get('help', '')} [env {name}]".strip()
        return super().add_argument(*args, **kwargs)

    def _parse_env(self, name: str, raw: str, kwargs: dict):
        action = kwargs.get("action")
        if action in ("store_true", "store_false", argparse.BooleanOptionalAction):
            value = raw.strip().lower()
            if value not in _TRUE | _FALSE:
                self.error(f"{name}={raw!r}: use one of 1/0, true/false, yes/no, on/off")
            return value in _TRUE
        if action == "append" or kwargs.get("nargs") in ("*", "+"):
            convert = kwargs.get("type", str)
            return [convert(part) for part in raw.split(",") if part]
        convert = kwargs.get("type", str)
        try:
            return convert(raw)
        except (TypeError, ValueError) as exc:
            self.error(f"{name}={raw!r}: {exc}")


def add_server_flags(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    """Flags every service takes: where to listen, limits, drain time, logging."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (loopback unless told otherwise)")
    parser.add_argument("--port", type=int, default=default_port, help="port to listen on; 0 = any free port")
    parser.add_argument("--port-file", default=None,
                        help="write the bound port to this file once serving (for launchers and tests)")
    parser.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024,
                        help="largest gRPC message accepted or sent")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds in-flight RPCs get to finish on SIGTERM/SIGINT")
    parser.add_argument("--metrics-port", type=int, default=None,
                        help="serve Prometheus /metrics on this port (none = off)")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level")


def configure_logging(level: str, prefix: str = "") -> None:
    """Log lines to stderr; `prefix` goes before each logger name (a router worker's "[worker 1] ")."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s")
