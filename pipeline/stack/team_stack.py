"""The local team stack: a PostgreSQL server and an MLflow tracking server on it, bound to 127.0.0.1.

    python -m pipeline.stack.team_stack up     # `make team-up`: start both (creates .team/ on first use)
    python -m pipeline.stack.team_stack down   # `make team-down`: stop both; the data stays in .team/

PostgreSQL holds the Optuna studies (database `optuna`: `tune.storage`) and MLflow's runs
(database `mlflow`); MLflow's artifacts go to .team/mlartifacts, served by the MLflow server.
The database password is generated once and kept in .team/pgpass (mode 600, libpq's password
file format): clients find it through PGPASSFILE, so it never appears in params.yaml, a command
line or an MLflow param. `up` writes .team/env with the environment to use, e.g.
`source .team/env && dvc exp run -S tune.storage=$TEAM_TUNE_STORAGE` (README "Running on
several machines").

PostgreSQL refuses to run as root: started by root, the server runs as the `postgres` system
user (Debian's package creates it), or `nobody`, and owns its data folder.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.runtime.cli import run_stage
from pipeline.runtime.errors import PipelineError

USER = "pipeline"  # the database role the pipeline connects as
DATABASES = ("optuna", "mlflow")
START_SECONDS = 120


def find_bindir() -> Path:
    """The folder with PostgreSQL's server programs (initdb, pg_ctl, postgres)."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).parent] if on_path else []
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version, reverse=True)]
    for folder in candidates:
        if all((folder / program).is_file() for program in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise PipelineError(
        "PostgreSQL's server programs (initdb, pg_ctl) were not found on PATH or in /usr/lib/postgresql/*/bin; "
        "install them (Debian/Ubuntu: apt-get install postgresql; macOS: brew install postgresql) "
        "or point the pipeline at an existing server instead"
    )


def _version(folder: str) -> int:
    name = Path(folder).parent.name
    return int(name) if name.isdigit() else 0


def _server_account() -> pwd.struct_passwd | None:
    """The unprivileged account the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PipelineError("running as root and neither a `postgres` nor a `nobody` account exists to run PostgreSQL")


@dataclass(frozen=True)
class Postgres:
    """A PostgreSQL server in `root` (data/, server.log) listening on 127.0.0.1:`port`."""

    root: Path
    port: int
    bindir: Path

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str) -> str:
        """The URL without password (libpq finds it in PGPASSFILE / PGPASSWORD)."""
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a server program as the server account (pg_ctl and initdb refuse root)."""
        account = _server_account()
        ids = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []} if account else {}
        proc = subprocess.run(command, capture_output=True, text=True, cwd=self.root, **ids)
        if check and proc.returncode != 0:
            output = (proc.stderr or proc.stdout)[-2000:]
            raise PipelineError(f"{Path(command[0]).name} failed ({proc.returncode}): {output}")
        return proc

    def initialise(self, password: str) -> None:
        """initdb with password authentication for every connection, owned by the server account."""
        self.root.mkdir(parents=True, exist_ok=True)
        pwfile = self.root / "initial-password"
        pwfile.write_text(password + "\n")
        account = _server_account()
        if account:
            for path in (self.root, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
        try:
            self._run(
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def start(self) -> None:
        options = f"-p {self.port} -h 127.0.0.1 -k {self.root}"  # TCP on loopback; the socket stays in root
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            str(START_SECONDS),
            "start",
        )

    def running(self) -> bool:
        return self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def stop(self) -> None:
        if self.data.is_dir() and self.running():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def create_databases(self, password: str, names: tuple[str, ...] = DATABASES) -> None:
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        with psycopg.connect(
            host="127.0.0.1", port=self.port, user=USER, password=password, dbname="postgres", autocommit=True
        ) as connection:
            for name in names:
                if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                    connection.execute(f'CREATE DATABASE "{name}"')


def write_pgpass(path: Path, port: int, password: str) -> None:
    """libpq's password file (https://www.postgresql.org/docs/current/libpq-pgpass.html), mode 600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"127.0.0.1:{port}:*:{USER}:{password}\n")


def read_pgpass_password(path: Path) -> str:
    return path.read_text().strip().split(":", 4)[4]


def start_mlflow_server(backend_uri: str, artifacts: Path, port: int, log: Path, env: dict) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` with the given store, artifacts served through it;
    returns once /health answers."""
    mlflow = Path(sys.executable).parent / "mlflow"
    with log.open("ab") as out:
        server = subprocess.Popen(
            [
                str(mlflow),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
                "--backend-store-uri",
                backend_uri,
                "--artifacts-destination",
                str(artifacts),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_SECONDS
    while not _healthy(f"http://127.0.0.1:{port}"):
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server.pid)
            raise PipelineError(f"the MLflow server did not start; its log {log} ends:\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return server


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def stop_process(pid: int) -> None:
    """SIGTERM the process group `pid` leads (the server and its workers), SIGKILL after 30 s."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(pid, signal.SIGKILL)


def up(root: Path, pg_port: int, mlflow_port: int) -> Path:
    """Start (or find running) the stack in `root`; returns the env file."""
    root = root.resolve()
    postgres = Postgres(root / "postgres", pg_port, find_bindir())
    pgpass = root / "pgpass"
    if not postgres.data.is_dir():
        password = secrets.token_urlsafe(24)
        postgres.initialise(password)
        write_pgpass(pgpass, pg_port, password)
    password = read_pgpass_password(pgpass)
    write_pgpass(pgpass, pg_port, password)  # the port may differ from the first `up`
    if not postgres.running():
        postgres.start()
    postgres.create_databases(password)
    print(f"PostgreSQL: {postgres.url('optuna')} and .../mlflow (log {postgres.root / 'server.log'})")

    env_file = root / "env"
    tracking_uri = f"http://127.0.0.1:{mlflow_port}"
    pid_file = root / "mlflow.pid"
    artifacts, log = root / "mlartifacts", root / "mlflow.log"
    if not _healthy(tracking_uri):
        env = {**os.environ, "PGPASSFILE": str(pgpass)}
        server = start_mlflow_server(postgres.url("mlflow"), artifacts, mlflow_port, log, env)
        pid_file.write_text(f"{server.pid}\n")
    print(f"MLflow: {tracking_uri} (runs in PostgreSQL, artifacts in {artifacts}, log {log})")
    env_file.write_text(
        "# source this file: the pipeline then tracks to the team's MLflow server and finds the database password\n"
        f"export PGPASSFILE={pgpass}\n"
        f"export MLFLOW_TRACKING_URI={tracking_uri}\n"
        f"export TEAM_TUNE_STORAGE={postgres.url('optuna')}\n"
    )
    print(f"Environment: source {env_file}   then   dvc exp run -S tune.storage=$TEAM_TUNE_STORAGE")
    return env_file


def down(root: Path) -> None:
    root = root.resolve()
    pid_file = root / "mlflow.pid"
    if pid_file.is_file():
        stop_process(int(pid_file.read_text()))
        pid_file.unlink()
        print("MLflow server stopped")
    data = root / "postgres" / "data"
    if data.is_dir():
        Postgres(root / "postgres", 0, find_bindir()).stop()
        print(f"PostgreSQL stopped (its data stays in {data}; `rm -rf {root}` removes everything)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down"))
    parser.add_argument("--dir", type=Path, default=Path(".team"), help="where the stack keeps its data (gitignored)")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port on 127.0.0.1")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port on 127.0.0.1")
    args = parser.parse_args(argv)
    if args.command == "up":
        up(args.dir, args.pg_port, args.mlflow_port)
    else:
        down(args.dir)


if __name__ == "__main__":
    run_stage(main)
