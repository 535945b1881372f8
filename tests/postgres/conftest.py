"""A private PostgreSQL cluster for the tests (session scope), and a Dagster home per test that uses
deploy/dagster.yaml against a fresh database in it.

The cluster is made with `initdb` and `pg_ctl` in a temporary directory, listening on 127.0.0.1 on
a free port, with password authentication. When the PostgreSQL binaries are missing,
scripts/system-deps.sh installs Debian's `postgresql`. initdb refuses to run as root: as root the
cluster belongs to the `postgres` user and the commands run through `runuser`."""

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import psycopg2
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONFIG = ROOT / "deploy" / "dagster.yaml"
SYSTEM_USER = "postgres"
SUPERUSER = "dagster"


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
        pytest.fail("PostgreSQL (initdb, pg_ctl) is missing: the tests in tests/postgres need Debian's postgresql. "
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


@pytest.fixture(scope="session")
def postgres_cluster():
    """A running private cluster: host, port, superuser and password."""
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
            pytest.fail(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}\n{server_log}")

    run(str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER, f"--pwfile={password_file}",
        "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync")
    options = (f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} "
               "-c max_connections=300 -c fsync=off -c synchronous_commit=off")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "120", "start")
    try:
        yield SimpleNamespace(host="127.0.0.1", port=port, user=SUPERUSER, password=password, log=log)
    finally:
        subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "120", "stop"],
                       capture_output=True, check=False, timeout=180)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_env(postgres_cluster, request):
    """The DAGSTER_PG_* variables for a fresh database in the private cluster."""
    name = "dagster_" + secrets.token_hex(4)
    connection = psycopg2.connect(host=postgres_cluster.host, port=postgres_cluster.port, user=postgres_cluster.user,
                                  password=postgres_cluster.password, dbname="postgres")
    connection.autocommit = True
    with contextlib.closing(connection), connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    return {
        "DAGSTER_PG_HOST": postgres_cluster.host,
        "DAGSTER_PG_PORT": str(postgres_cluster.port),
        "DAGSTER_PG_USER": postgres_cluster.user,
        "DAGSTER_PG_PASSWORD": postgres_cluster.password,
        "DAGSTER_PG_DB": name,
    }


def deploy_home(tmp_path: Path, *, pool_limit: int | None = None, **run_monitoring: int) -> Path:
    """A DAGSTER_HOME whose dagster.yaml is deploy/dagster.yaml, with run monitoring's intervals
    shortened and the pools' step limit raised for a test when given."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    config = yaml.safe_load(DEPLOY_CONFIG.read_text())
    config["run_monitoring"].update(run_monitoring)
    if pool_limit is not None:
        config["concurrency"]["pools"]["default_limit"] = pool_limit
    config["nux"] = {"enabled": False}
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return home
