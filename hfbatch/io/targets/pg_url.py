"""A Postgres table as `-o` names it: `postgresql://user[:password]@host:port/db?table=NAME[&schema=S]`.

PgLocation keeps the URL for libpq alone and shows it only as `user:***@host` (a `password=`
parameter too); a URL that Python's parser and libpq would split differently is refused without
showing any of it. Names are checked as Postgres would keep them: one longer than 63 bytes
(which Postgres cuts silently, so two columns could become one) or holding a NUL is refused, as
is a table named like hfbatch's own bookkeeping tables.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from ...errors import InputError, redact_text

SCHEMES = ("postgresql", "postgres")
TARGETS_TABLE = "hfbatch_targets"  # one row per synced table: its vector record and version
JOBS_TABLE = "hfbatch_jobs"  # one row per table synced in parts (--commit-every): the last job's watermark
SHADOW_PREFIX = "hfbatch_new_"  # a rebuild in parts writes this table before it is swapped in
MAX_NAME_BYTES = 63  # NAMEDATALEN - 1: Postgres cuts longer names (silently, with a NOTICE)
_SECRET_QUERY = ("password", "sslpassword")


def is_postgres_url(text: Any) -> bool:
    return isinstance(text, (str, PgLocation)) and str(text).split("://", 1)[0].lower() in SCHEMES and "://" in str(text)


def check_name(name: str, what: str) -> str:
    """A schema, table or column name Postgres keeps as given (quoted), else a one-line refusal."""
    if not name:
        raise InputError(f"{what}: an empty name; give a name.")
    if "\x00" in name:
        raise InputError(f"{what} {name[:40]!r}: a NUL character cannot be in a Postgres name; rename it.")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InputError(f"{what} {name[:40]!r}...: {len(name.encode())} bytes, longer than Postgres's "
                         f"{MAX_NAME_BYTES}-byte names (it would cut it); rename it.")
    return name


class PgLocation:
    """A table -o names by a postgresql:// URL. `str()` and `url` are the URL without its password
    (the only forms ever shown or recorded); `conninfo` (with it) goes to libpq alone."""

    def __init__(self, url: str):
        _refuse_ambiguous(str(url))
        parts = urlsplit(str(url))
        query = parse_qsl(parts.query, keep_blank_values=True)
        self.shown = _shown(parts, query)
        table = [v for k, v in query if k == "table"]
        schema = [v for k, v in query if k == "schema"]
        if not table or not table[-1]:
            raise InputError(f"-o {self.shown}: names no table; add ?table=NAME (and &schema=NAME for another "
                             "schema than public).")
        self.table = check_name(table[-1], "-o ...?table=")
        if self.table in (TARGETS_TABLE, JOBS_TABLE) or self.table.startswith(SHADOW_PREFIX):
            raise InputError(f"-o {self.shown}: {self.table} is the name of hfbatch's own bookkeeping table; give "
                             "another table name.")
        self.schema = check_name(schema[-1], "-o ...&schema=") if schema else "public"
        if not parts.path.strip("/") and not any(k == "dbname" for k, _ in query):
            raise InputError(f"-o {self.shown}: names no database; give postgresql://user@host:port/DBNAME?table=...")
        rest = [(k, v) for k, v in query if k not in ("table", "schema")]
        self._conninfo = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), ""))
        # (only to be taken out of messages: as written, and as libpq decodes it)
        given = [parts.password or "", *(v for k, v in query if k in _SECRET_QUERY)]
        self._secrets = sorted({s for p in given if p for s in (p, unquote(p))}, key=len, reverse=True)

    @property
    def conninfo(self) -> str:
        return self._conninfo

    @property
    def url(self) -> str:
        return self.shown

    @property
    def name(self) -> str:
        return self.table

    @property
    def qualified(self) -> str:
        """schema.table as text: the advisory lock's and hfbatch_targets' key."""
        return f"{self.schema}.{self.table}"

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"PgLocation({self.shown!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PgLocation) and (self._conninfo, self.schema, self.table) == \
            (other._conninfo, other.schema, other.table)

    def __hash__(self) -> int:
        return hash((self._conninfo, self.schema, self.table))

    def clean(self, text: str) -> str:
        """`text` (a server's or libpq's message) with this URL's password taken out."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact_text(text)


def _refuse_ambiguous(url: str) -> None:
    """A URL that Python's parser and libpq would split differently (a password holding @, /, ?
    or #, unencoded) is refused without showing any of it: shown, half of it could be the password."""
    rest = url.split("://", 1)[1]
    authority_end = min([i for i in (rest.find("/"), rest.find("?")) if i >= 0] or [len(rest)])
    ats = [i for i, c in enumerate(rest) if c == "@"]
    if "#" in rest or len(ats) > 1 or (ats and ats[0] > authority_end):
        raise InputError("-o postgresql://...: the URL holds @, /, ? or # where they cannot be read one way only (a "
                         "password holding one?); percent-encode them in the password (%40 %2F %3F %23), or leave the "
                         "password out of the URL and give it in PGPASSWORD or ~/.pgpass.")


def _shown(parts: Any, query: list[tuple[str, str]]) -> str:
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    shown_query = "&".join(f"{k}={'***' if k in _SECRET_QUERY else quote(v, safe='/')}" for k, v in query)
    return urlunsplit((parts.scheme, netloc, parts.path, shown_query, ""))


