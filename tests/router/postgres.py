"""A throwaway PostgreSQL server for tests (Debian's ``postgresql`` package, which the README's test
command installs): initdb into a temporary folder, listen on 127.0.0.1 only, trust local logins.
``start()`` returns its URL, or raises ``Unavailable`` with the reason where it cannot run."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from agora.router.replicas import free_port


class Unavailable(RuntimeError):
    pass


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class Postgres:
    def __init__(self) -> None:
        self.dir: Path | None = None
        self.port = 0
        self._as: list[str] = []

    def start(self) -> str:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise Unavailable("PostgreSQL is not installed (Debian package postgresql; `make test` installs it)")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable("psycopg is not installed (pip install 'agora[postgres]')") from None
        self.dir = Path(tempfile.mkdtemp(prefix="agora-pg-"))
        if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the package's user
            if shutil.which("runuser") is None:
                raise Unavailable("running as root without runuser to start PostgreSQL as another user")
            try:
                shutil.chown(self.dir, "postgres", "postgres")
            except (LookupError, OSError) as exc:
                raise Unavailable(f"no postgres user to run the server as: {exc}") from None
            self._as = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        self.port = free_port()
        self._run([initdb, "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
        opts = f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.dir} -c fsync=off"
        self._run([pg_ctl, "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start"])
        url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        deadline = time.monotonic() + 30
        import psycopg

        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                return url
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise Unavailable("PostgreSQL started but does not accept connections") from None
                time.sleep(0.2)

    def database(self, name: str) -> str:
        """A fresh database on the server (one per test keeps tests apart)."""
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def _run(self, cmd: list[str]) -> None:
        try:
            subprocess.run([*self._as, *cmd], check=True, capture_output=True, text=True, timeout=120)
        except subprocess.CalledProcessError as exc:
            raise Unavailable(f"{Path(cmd[0]).name} failed: {(exc.stderr or exc.stdout).strip()[:400]}") from None

    def stop(self) -> None:
        pg_ctl = _bin("pg_ctl")
        if self.dir is not None and pg_ctl is not None and (self.dir / "data" / "postmaster.pid").exists():
            subprocess.run([*self._as, pg_ctl, "-D", str(self.dir / "data"), "-m", "immediate", "stop"],
                           capture_output=True, timeout=60)  # fmt: skip
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
