"""A private PostgreSQL cluster, usable from pytest fixtures and from plain scripts (bench).

`private_cluster()` makes a cluster with `initdb` and `pg_ctl` in a temporary directory, listening on
127.0.0.1 on a free port, with password authentication, and removes it on exit. When the PostgreSQL
binaries are missing, scripts/system-deps.sh installs Debian's `postgresql`. initdb refuses to run as
root: as root the cluster belongs to the `postgres` user and the commands run through `runuser`."""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_USER = "postgres"
SUPERUSER = "dagster"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the private cluster did not start."""


@dataclass(frozen=True)
class PostgresCluster:
    host: str
    port: int
    user: str
    password: str
    log: Path

    def create_database(self, prefix: str = "db") -> str:
        """A fresh database in the cluster; returns its name."""
        import psycopg2

        name = f"{prefix}_{secrets.token_hex(4)}"
        connection = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                      dbname="postgres")
        connection.autocommit = True
        with contextlib.closing(connection), connection.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        return name

    def libpq(self, dbname: str, *, with_password: bool = True) -> str:
        """A libpq key=value connection string for one database."""
        parts = [f"dbname={dbname}", f"host={self.host}", f"port={self.port}", f"user={self.user}"]
        if with_password:
            parts.append(f"password={self.password}")
        return " ".join(parts)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def postgres_bindir() -> Path | None:
    """Where initdb and pg_ctl are: `pg_config --bindir`, /usr/lib/postgresql/<newest>/bin, or PATH."""
    candidates = []
    if shutil.which("pg_config"):
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=False)
        candidates.append(found.stdout.strip())
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).resolve().parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    return None


def ensure_postgres_installed() -> Path:
    bindir = postgres_bindir()
    if bindir is None:
        subprocess.run([str(ROOT / "scripts" / "system-deps.sh")], check=False)
        bindir = postgres_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "PostgreSQL (initdb, pg_ctl) is missing: a private cluster needs Debian's postgresql. "
            "Run `make system-deps` (as root: apt-get install -y postgresql).")
    return bindir


def as_cluster_owner() -> tuple[list[str], int | None, int | None]:
    """The command prefix and uid/gid the cluster runs as: `postgres` via runuser when root, else ourselves."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        user = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
                       check=True)
        user = pwd.getpwnam(SYSTEM_USER)
    return ["runuser", "-u", SYSTEM_USER, "--"], user.pw_uid, user.pw_gid


@contextlib.contextmanager
def private_cluster(max_connections: int = 300, *, durable: bool = False) -> Iterator[PostgresCluster]:
    """A running private cluster (host, port, superuser, password), stopped and removed on exit.
    Tests run it without fsync and synchronous commits; `durable` keeps PostgreSQL's defaults (bench)."""
    bindir = ensure_postgres_installed()
    prefix, uid, gid = as_cluster_owner()
    base = Path(tempfile.mkdtemp(prefix="erp-postgres-"))  # under /tmp: reachable by the postgres user
    data, password_file, log = base / "data", base / "password", base / "postgres.log"
    password = secrets.token_urlsafe(16)
    password_file.write_text(password + "\n")
    if uid is not None:
        for path in (base, password_file):
            os.chown(path, uid, gid)
    port = free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*prefix, *command], capture_output=True, text=True, check=False, timeout=180)
        if done.returncode != 0:
            server_log = log.read_text()[-3000:] if log.exists() else ""
            raise PostgresUnavailable(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}\n{server_log}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={password_file}",
            "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
        options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} "
                   f"-c max_connections={max_connections}" + ("" if durable else " -c fsync=off -c synchronous_commit=off"))
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "120", "start")
        yield PostgresCluster(host="127.0.0.1", port=port, user=SUPERUSER, password=password, log=log)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "120",
                            "stop"], capture_output=True, check=False, timeout=180)
        shutil.rmtree(base, ignore_errors=True)


def ducklake_env(cluster: PostgresCluster, data_dir: Path) -> dict[str, str]:
    """ERP_DUCKLAKE_CATALOG (a fresh catalog database in `cluster`; the password in PGPASSWORD, as
    libpq reads it, not in the catalog string) and ERP_DUCKLAKE_DATA_PATH (`data_dir`)."""
    return {"ERP_DUCKLAKE_CATALOG": "postgres:" + cluster.libpq(cluster.create_database("lake"), with_password=False),
            "ERP_DUCKLAKE_DATA_PATH": f"{data_dir}/", "PGPASSWORD": cluster.password}
