"""A shared MLflow tracking server: PostgreSQL as its store, artifacts served by the server.

    python -m fmnist.tracking_server start|stop|status [--dir .tracking-server] [--port 5000]

``start`` creates (first time) or reuses a PostgreSQL cluster in ``<dir>/postgres``, starts
it on 127.0.0.1 on a free port, then starts ``mlflow server`` with that database as its
backend store and ``<dir>/artifacts`` behind ``--serve-artifacts`` (clients upload and download
artifacts through the server, so they need no access to its disk). It prints the
``MLFLOW_TRACKING_URI`` to export: the pipeline then logs there. ``stop`` stops both;
``status`` says whether they run. What was started is written to ``<dir>/server.json``.

PostgreSQL refuses to run as root: as root, its commands run as the ``postgres`` user that
Debian's package creates (``make deps-system`` installs it), which owns ``<dir>/postgres``.

This module starts processes and never imports mlflow (fmnist.tracking is its only importer).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_DIR = Path(".tracking-server")
STATE_FILE = "server.json"
DATABASE = "mlflow"
# fmnist.search's Optuna studies: a database of their own (Optuna and MLflow each keep their
# schema version in a table named alembic_version)
SEARCH_DATABASE = "optuna"
DB_USER = "mlflow"
INSTALL_HINT = "run `make deps-system` (apt-get install -y postgresql) first"


class ServerError(RuntimeError):
    """The tracking server cannot be started or stopped."""


@dataclass(frozen=True)
class Server:
    """What ``start`` started: enough for ``stop`` and for clients."""

    tracking_uri: str
    backend_store_uri: str
    mlflow_pid: int
    postgres_port: int
    postgres_data: str
    artifacts: str
    log: str


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs (Debian keeps them out of PATH)."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                   key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0)
    if not found:
        raise ServerError(f"PostgreSQL's server programs (pg_ctl, initdb) are not installed; {INSTALL_HINT}")
    return Path(found[-1]).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run ``command`` as the ``postgres`` user."""
    if os.geteuid() != 0:
        return command
    try:
        pwd.getpwnam("postgres")
    except KeyError as error:
        raise ServerError(f"running as root, PostgreSQL needs the 'postgres' user, which does not exist; "
                          f"{INSTALL_HINT}") from error
    return ["runuser", "-u", "postgres", "--", *command]


def _check_reachable_by_postgres(folder: Path) -> None:
    """As root, the postgres user must be able to enter every folder above its data."""
    if os.geteuid() != 0:
        return
    for parent in folder.resolve().parents:
        if not parent.stat().st_mode & stat.S_IXOTH:
            raise ServerError(f"the postgres user cannot reach {folder}: {parent} is not searchable by "
                              f"others (chmod o+x {parent}, or choose another --dir)")


def _run(command: list[str], doing: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        raise ServerError(f"{doing} failed ({' '.join(command[:1])} exit {result.returncode}): "
                          f"{detail[-1] if detail else ''}")
    return result.stdout


def _pg_ctl(data: Path, *args: str) -> list[str]:
    return _as_postgres_user([str(postgres_bin() / "pg_ctl"), "-D", str(data), *args])


def _damaged(data: Path) -> str:
    return (f"if its data folder is damaged, restore {data} from a backup, or remove it to start "
            "afresh (losing the runs and registered models it holds)")


def _log_cause(log: Path, offset: int) -> str:
    """What PostgreSQL wrote to ``log`` after ``offset`` that says why it stopped: its FATAL or
    PANIC lines, else the lines that are not routine LOG lines, as one line."""
    try:
        with log.open("rb") as f:
            f.seek(offset)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    fatal = [line for line in lines if any(level in line for level in ("FATAL:", "PANIC:", "ERROR:"))]
    cause = fatal or [line for line in lines if " LOG: " not in line and "HINT:" not in line] or lines[-1:]
    text = " ".join(cause[-3:])
    return text if len(text) <= 500 else text[:500] + " ..."


def _start_postgres(data: Path, port: int) -> None:
    if data.is_dir() and any(data.iterdir()) and not (data / "PG_VERSION").is_file():
        raise ServerError(f"{data} is not a PostgreSQL data folder (it holds no PG_VERSION); "
                          f"{_damaged(data)}")
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        data.chmod(0o700)
        if os.geteuid() == 0:
            shutil.chown(data, "postgres", "postgres")
        # trust: only 127.0.0.1 can connect (listen_addresses below); see docs/team.md for a team server
        _run(_as_postgres_user([str(postgres_bin() / "initdb"), "-D", str(data), "-U", DB_USER,
                                "--auth=trust", "-E", "UTF8", "--no-instructions"]),
             "creating the PostgreSQL cluster")
    # no Unix socket: its default folder (/var/run/postgresql) may not exist, and TCP suffices
    options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
    log = data / "server.log"
    logged = log.stat().st_size if log.is_file() else 0
    try:
        _run(_pg_ctl(data, "-l", str(log), "-w", "-t", "60", "-o", options, "start"), "starting PostgreSQL")
    except ServerError as error:  # pg_ctl says only "Examine the log output."
        cause = _log_cause(log, logged)
        if not cause:
            raise
        raise ServerError(f"starting PostgreSQL failed: {cause} (log: {log}); {_damaged(data)}") from error
    for database, kind in ((DATABASE, "MLflow"), (SEARCH_DATABASE, "search")):
        exists = _run([str(postgres_bin() / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER,
                       "-d", "postgres", "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{database}'"],
                      f"looking up the {kind} database")
        if exists.strip() != "1":
            _run([str(postgres_bin() / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER,
                  database], f"creating the {kind} database")


def search_storage(server: Server) -> str:
    """The URL of the server's database for fmnist.search's studies (``--storage``)."""
    return f"postgresql://{DB_USER}@127.0.0.1:{server.postgres_port}/{SEARCH_DATABASE}"


def _stop_postgres(data: Path) -> None:
    status = subprocess.run(_pg_ctl(data, "status"), capture_output=True, timeout=60)
    if status.returncode == 0:  # 3: not running (a stale postmaster.pid included)
        _run(_pg_ctl(data, "-w", "-t", "60", "-m", "fast", "stop"), "stopping PostgreSQL")


def _answers(uri: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(uri + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _who_answers(host: str, port: int) -> str | None:
    """What listens on ``host:port`` in a few words, or None when nothing does."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return None
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/", timeout=3) as response:
            server = response.headers.get("Server")
    except urllib.error.HTTPError as error:  # an HTTP answer all the same
        server = error.headers.get("Server")
    except (urllib.error.URLError, OSError):
        return "something that is not an HTTP server answers there"
    return f"an HTTP server answers there{f' (Server: {server})' if server else ''}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child that exited) is not alive
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


def _stop_group(pid: int, timeout_s: float = 30.0) -> None:
    """SIGTERM the server's process group (the server and its workers), SIGKILL after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
            if not _alive(pid) and not _group_alive(pid):
                return
            time.sleep(0.2)


def _group_alive(pgid: int) -> bool:
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = Path(stat_file).read_text().split(")")[-1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def read_state(folder: Path) -> Server | None:
    state = Path(folder) / STATE_FILE
    if not state.is_file():
        return None
    return Server(**json.loads(state.read_text()))


def start(folder: Path = DEFAULT_DIR, port: int | None = None, workers: int = 2,
          timeout_s: float = 180.0) -> Server:
    """Start PostgreSQL and the MLflow server (or return the running one); see the module doc."""
    folder = Path(folder).resolve()
    running = read_state(folder)
    if running is not None and _alive(running.mlflow_pid) and _answers(running.tracking_uri):
        return running
    if running is not None:  # left by a crash or a reboot: clean up what is left
        stop(folder)
    # mlflow server cannot bind a taken port, but the other server would answer our health
    # check: refuse before anything is started
    taken = _who_answers("127.0.0.1", port) if port else None
    if taken:
        raise ServerError(f"127.0.0.1:{port} is taken: {taken}; stop it (`make mlflow-ui` uses port "
                          "5000 too) or start on another port (--port)")
    folder.mkdir(parents=True, exist_ok=True)
    _check_reachable_by_postgres(folder)
    data, artifacts = folder / "postgres", folder / "artifacts"
    artifacts.mkdir(exist_ok=True)
    pg_port = free_port()
    _start_postgres(data, pg_port)
    port = port or free_port()
    backend = f"postgresql://{DB_USER}@127.0.0.1:{pg_port}/{DATABASE}"
    uri = f"http://127.0.0.1:{port}"
    log = folder / "mlflow-server.log"
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", backend,
               "--serve-artifacts", "--artifacts-destination", str(artifacts),
               "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    # MLflow's job runner (GenAI evaluation jobs, which this project does not use) starts seven
    # more worker processes; on a small machine they compete with training
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("ab") as out:  # its own session and group: stop ends its workers too
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    server = Server(uri, backend, process.pid, pg_port, str(data), str(artifacts), str(log))
    (folder / STATE_FILE).write_text(json.dumps(asdict(server), indent=1) + "\n")
    deadline = time.monotonic() + timeout_s  # the first start creates the tables (tens of seconds)
    while process.poll() is not None or not _answers(uri):
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
            stop(folder)
            why = "exited" if process.returncode is not None else f"did not answer in {timeout_s:.0f} s"
            raise ServerError(f"mlflow server {why}; see {log}: {tail[0] if tail else ''}")
        time.sleep(0.5)
    return server


def stop(folder: Path = DEFAULT_DIR) -> bool:
    """Stop the MLflow server and PostgreSQL started from ``folder``; False if none was running."""
    folder = Path(folder).resolve()
    server = read_state(folder)
    if server is None:
        return False
    _stop_group(server.mlflow_pid)
    _stop_postgres(Path(server.postgres_data))
    (folder / STATE_FILE).unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR,
                        help="where the database, the artifacts and the logs live (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000,
                        help="the MLflow server's port (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            server = start(args.dir, args.port)
            print(f"MLflow server on PostgreSQL running (artifacts in {server.artifacts}, log "
                  f"{server.log}).\nHyperparameter searches: python -m fmnist.search --storage "
                  f"{search_storage(server)}\n"
                  f"export MLFLOW_TRACKING_URI={server.tracking_uri}")
        elif args.action == "stop":
            print("stopped" if stop(args.dir) else f"no server was started from {args.dir}")
        else:
            server = read_state(args.dir)
            if server is None or not _alive(server.mlflow_pid):
                print(f"not running (no server started from {args.dir})")
                return 1
            answers = "answers" if _answers(server.tracking_uri) else "does NOT answer"
            print(f"{server.tracking_uri} {answers} (pid {server.mlflow_pid}; PostgreSQL on port "
                  f"{server.postgres_port})")
    except ServerError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
