"""Connection URLs: kept as written, shown without their password, resolved only to connect.

A URL is a SQLAlchemy URL (``sqlite:///shop.db``, ``postgresql://etl:pw@host/dw``).
It may name environment variables, ``postgresql://etl:${DW_PASSWORD}@host/dw``;
they are expanded in the process that connects, so a plan that travels to a
worker or a JSON file carries the variable's name, never its value.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from sqlalchemy.engine import make_url

from mapperdsl.errors import DeclarationError, ExecutionError

DIALECTS = ("sqlite", "postgresql", "mysql")  # mysql (MariaDB too): as a source only
TARGET_DIALECTS = ("sqlite", "postgresql")
MASK = "***"

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s]*:)(?P<pw>[^@\s]*)(?P<at>@)")
# The user part of a URL as the whole text (SQLAlchemy's own reading: the password runs to the
# first "@", blanks and all); _USERINFO finds URLs in free text, so it stops at a blank.
_URL_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@]*:)(?P<pw>[^@]*)(?P<at>@)")
_QUERY_PW = re.compile(r"(?i)(?P<head>[?&]password=)(?P<pw>[^&\s]*)")
_SECRETS: set[str] = set()  # every literal password this process has seen, scrubbed from any text


def redact_text(text: str) -> str:
    """Remove passwords from any text: URL user-info, ``password=`` and every known secret."""
    text = _USERINFO.sub(lambda m: m["head"] + _mask(m["pw"]) + m["at"], text)
    text = _QUERY_PW.sub(lambda m: m["head"] + _mask(m["pw"]), text)
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def _mask(password: str) -> str:
    return password if _ENV.fullmatch(password) else MASK


@dataclass(frozen=True, repr=False)
class Url:
    """A connection URL as the user wrote it; its password never leaves through display.

    Examples
    --------
    >>> Url.parse("postgresql://etl:s3cret@db/dw")
    Url('postgresql://etl:***@db/dw')
    """

    written: str = field(compare=True)

    @classmethod
    def parse(cls, value: str | Url, *, argument: str = "url") -> Url:
        if isinstance(value, Url):
            return value
        if not isinstance(value, str) or "://" not in value:
            raise DeclarationError(
                f"`{argument}` must be a SQLAlchemy URL such as 'sqlite:///shop.db' or "
                f"'postgresql://user@host/db', got {redact_text(repr(value))}"
            )
        url = cls(value)
        if url.dialect not in DIALECTS:
            raise DeclarationError(
                f"`{argument}` uses the database {url.dialect!r}; supported: {', '.join(DIALECTS)}"
            )
        problem = _misshapen(value, url.dialect)
        if problem:
            raise DeclarationError(f"`{argument}` {problem}")
        url._remember_secret()
        return url

    @property
    def dialect(self) -> str:
        scheme = self.written.split("://", 1)[0].split("+", 1)[0].lower()
        return {"postgres": "postgresql", "mariadb": "mysql"}.get(scheme, scheme)

    @property
    def redacted(self) -> str:
        return redact_text(_URL_USERINFO.sub(lambda m: m["head"] + _mask(m["pw"]) + m["at"],
                                             self.written))

    def __repr__(self) -> str:
        return f"Url({self.redacted!r})"

    def __str__(self) -> str:
        return self.redacted

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # Unpickled in a worker: remember the secret there too, so its errors are scrubbed.
        return (_rebuild, (self.written,))

    def absolute(self) -> Url:
        """The same URL with a relative SQLite path made absolute (workers may run elsewhere)."""
        if self.dialect != "sqlite":
            return self
        path = self.written.split(":///", 1)[1] if ":///" in self.written else ""
        if not path or path.startswith(":memory:") or os.path.isabs(path) or "${" in path:
            return self
        return Url(self.written.split(":///", 1)[0] + ":///" + str(Path(path).resolve()))

    def resolved(self) -> str:
        """The URL with ``${VAR}`` expanded from the environment, for connecting only."""
        missing = [name for name in _ENV.findall(self.written) if name not in os.environ]
        if missing:
            raise ExecutionError(
                f"URL {self.redacted} names the environment variable(s) {', '.join(missing)}, "
                "which are not set in this process; set them before running"
            )
        text = _ENV.sub(lambda m: os.environ[m[1]], self.written)
        password = make_url(text).password
        if password:
            _SECRETS.add(str(password))
        return text

    def sqlalchemy_url(self) -> str:
        """The URL for SQLAlchemy, with the driver mapperdsl installs (psycopg 3; PyMySQL
        from the ``mysql`` extra)."""
        text = self.resolved()
        scheme, rest = text.split("://", 1)
        if scheme in ("postgresql", "postgres"):
            scheme = "postgresql+psycopg"
        elif scheme in ("mysql", "mariadb"):
            scheme = "mysql+pymysql"
        return f"{scheme}://{rest}"

    def connectorx_url(self) -> str:
        """The URL for ConnectorX, which takes no ``+driver`` suffix."""
        text = self.resolved()
        return f"{self.dialect}://{text.split('://', 1)[1]}"

    def to_json(self, *, password_variable: str) -> str:
        """The URL for a saved plan: a literal password (in the user part or a ``password=``
        query parameter) becomes ``${password_variable}``."""
        variable = "${" + password_variable + "}"

        def swap(m: re.Match[str]) -> str:
            return m["head"] + (m["pw"] if _ENV.fullmatch(m["pw"]) or not m["pw"] else variable)

        text = _URL_USERINFO.sub(lambda m: swap(m) + m["at"], self.written)
        return _QUERY_PW.sub(swap, text)

    def _remember_secret(self) -> None:
        found = [m["pw"] for m in (*_URL_USERINFO.finditer(self.written),
                                   *_QUERY_PW.finditer(self.written))]
        for password in found:
            if password and not _ENV.fullmatch(password):
                _SECRETS.add(password)
                _SECRETS.add(unquote(password))


_DRIVERS = {"sqlite": "pysqlite", "postgresql": "psycopg", "mysql": "pymysql"}  # what connects


def _misshapen(text: str, dialect: str) -> str | None:
    """What is wrong with the shape of URL ``text`` that SQLAlchemy would only trip over when
    connecting (an ``IndexError`` or a port's ``ValueError``), or None; never its password."""
    scheme, rest = text.split("://", 1)
    driver = scheme.partition("+")[2].lower()
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    user, _, host = authority.rpartition("@")
    if "@" in user.partition(":")[2]:  # SQLAlchemy's password ends at its first: the rest of
        # it would be the host (a user name may hold one: 'etl@server' on Azure)
        return (f"has an '@' in its password ({scheme}://***@{host}...): write it as %40")
    if driver and driver != _DRIVERS[dialect]:
        return (f"names the driver {driver!r}; mapperdsl connects to {dialect} with "
                f"{_DRIVERS[dialect]}: write {dialect}://... without a driver, got "
                f"{redact_text(repr(text))}")
    if dialect == "sqlite":
        if not rest.startswith("/"):
            return ("is a SQLite URL without a path: three slashes before a relative path "
                    "(sqlite:///shop.db), four before an absolute one (sqlite:////data/shop.db), "
                    f"got {redact_text(repr(text))}")
        return None
    if "${" not in authority:
        try:
            _ = make_url(text).port  # (read only when asked: int() of its text)
        except ValueError:
            port = host.rpartition(":")[2]
            return f"has a port that is not a number: {port!r} (in {redact_text(repr(text))})"
    return None


def _rebuild(written: str) -> Url:
    url = Url(written)
    url._remember_secret()
    return url
