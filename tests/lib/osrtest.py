"""Helpers shared by the Python test suites tests/nbd, tests/site and tests/e2e.

Each suite's conftest.py puts tests/lib on sys.path and imports from here; the
suites still run separately, one pytest command per directory, and their test
files keep importing from `conftest` (which re-exports what they use).

Binaries and tools (a missing one FAILS the test with a message, never skips):
    osrd_path(), osr_path()       the binaries: env OSRD / OSR, else <repo>/build/...
    require_binary(path, name, env), require_osrd(), require_osr()
    require_tool(name)            a tool on PATH (qemu-img, nbdinfo, fio, ...)
    require_libnbd()              the python3-libnbd module (Debian's /usr/bin/python3)

Daemons:
    OsrdProcess                   base class of one `osrd ...` process that prints
                                  'osrd: ready' on stdout once it serves: start() waits
                                  for that line (bounded by ready_timeout), hands every
                                  stdout line to on_stdout_line() (to parse listen
                                  addresses), then keeps draining stdout; stop() sends
                                  SIGTERM and falls back to SIGKILL (a failure) after
                                  STOP_TIMEOUT_S; stop_clean() requires exit status 0;
                                  kill9(), restart(), alive(), stderr() (the log tail).
    stop_all_clean(procs)         teardown: SIGTERM what still runs; each must exit 0.
    free_port()                   a TCP port on 127.0.0.1 that was free a moment ago.
    PgServer                      a real PostgreSQL 15 server (initdb into a temp dir, run as
                                  the postgres user when the test runs as root, on a free
                                  port of 127.0.0.1, its socket in the temp dir): start(),
                                  stop(), restart(), create_database() -> URL, sql(db, text),
                                  close() (stops and removes it). Missing binaries FAIL.
    Catalog                       the vault's catalog as a test reaches it behind the
                                  vault's back, SQLite file or PostgreSQL database alike:
                                  query(sql, *params) -> rows, execute(sql, *params) ->
                                  row count, dump() -> every row as text, db_arg.
    --vault-db / OSR_TEST_VAULT_DB  which catalog the suites' vaults use (sqlite, the
                                  default, or postgresql): add_vault_db_option(parser) in a
                                  conftest's pytest_addoption; the fixtures vault_pg_server
                                  (one PgServer per session) and new_catalog (a new catalog
                                  per vault, a fresh database on PostgreSQL).

Waiting and seeds:
    wait_for(pred, timeout, what, interval, detail)   bounded polling
    seed_from_env()               OSR_TEST_SEED, else a random seed

NBD clients (python3-libnbd) and bytes:
    connect(uri, handle_name, ...), close_handle(h), read_handle(h, size, what),
    read_uri(uri, size, handle_name)
    first_difference(a, b), assert_same_bytes(got, want, what)
    random_op(rng, size, ...), apply_op(h, ...), apply_model(disk_bytes, ...)
"""

import contextlib
import io
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

try:
    import nbd  # python3-libnbd
except ImportError:  # pragma: no cover - reported by require_libnbd()
    nbd = None

REPO_ROOT = Path(__file__).resolve().parents[2]
KIB = 1024
MIB = 1024 * 1024

READY_TIMEOUT_S = 10
STOP_TIMEOUT_S = 10
READ_CHUNK = 4 * MIB


# -- binaries, tools and modules ------------------------------------------------------


def osrd_path():
    return Path(os.environ.get("OSRD", str(REPO_ROOT / "build" / "osrd")))


def osr_path():
    return Path(os.environ.get("OSR", str(REPO_ROOT / "build" / "osr")))


def require_binary(path, name, env):
    """Returns path if it exists; otherwise fails the test, naming the variable env."""
    if not path.exists():
        pytest.fail(f"{name} binary not found at {path} (build it, or set {env})", pytrace=False)
    return path


def require_osrd():
    return require_binary(osrd_path(), "osrd", "OSRD")


def require_osr():
    return require_binary(osr_path(), "osr", "OSR")


def require_tool(name):
    """Returns the path of a tool; a missing tool fails the test loudly."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"required tool '{name}' is not installed (scripts/bootstrap installs it)",
                    pytrace=False)
    return path


def require_libnbd():
    if nbd is None:
        pytest.fail("python3-libnbd is missing: run the tests with Debian's /usr/bin/python3 "
                    "(apt-get install python3-libnbd)", pytrace=False)
    return nbd


def time_factor():
    """How much slower this build runs its daemons (OSR_TEST_TIME_FACTOR: 3 under
    ASan/UBSan): the factor a test's watchdogs are stretched by."""
    return float(os.environ.get("OSR_TEST_TIME_FACTOR", "1"))


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a real PostgreSQL server ---------------------------------------------------------------

PG_BIN_DEFAULT = "/usr/lib/postgresql/15/bin"
PG_START_ATTEMPTS = 5  # a port taken between choosing it and the server binding it


class PgServer:
    """A PostgreSQL server of Debian's postgresql package for one test (or a session).

    The binaries come from OSR_PG_BIN, else /usr/lib/postgresql/15/bin; a missing one
    fails the test. PostgreSQL refuses to run as root: as root, the server and its tools
    run as the `postgres` user, which owns the temp dir. Use as a context manager or call
    close(); the vault reaches it at url(db) (trust authentication on 127.0.0.1).
    """

    def __init__(self):
        import tempfile

        self.bin = Path(os.environ.get("OSR_PG_BIN", PG_BIN_DEFAULT))
        for tool in ("initdb", "pg_ctl", "postgres", "psql"):
            if not os.access(self.bin / tool, os.X_OK):
                pytest.fail(
                    f"PostgreSQL's {tool} is not in {self.bin} (install Debian's postgresql: "
                    "scripts/bootstrap, or set OSR_PG_BIN)",
                    pytrace=False,
                )
        self.as_user = []
        if os.geteuid() == 0:
            require_tool("runuser")
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="osr-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        self.port = 0
        self.running = False
        self._databases = 0
        self._run([str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust",
                   "-U", "postgres", "-E", "UTF8", "--no-sync", "--no-instructions"], "initdb")

    def _run(self, argv, what, check=True, timeout=90):
        r = subprocess.run(self.as_user + argv, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            pytest.fail(f"{what} exited {r.returncode}: {r.stdout}{r.stderr}\n{self.log_tail()}",
                        pytrace=False)
        return r

    def log_tail(self, chars=2000):
        log = self.dir / "server.log"
        return log.read_text(errors="replace")[-chars:] if log.exists() else ""

    def start(self):
        """Starts the server on a free port of 127.0.0.1 (the same port again after stop())."""
        if self.running:
            return self
        for attempt in range(PG_START_ATTEMPTS):
            port = self.port or free_port()
            options = (f"-p {port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
            r = self._run([str(self.bin / "pg_ctl"), "start", "-w", "-t", "60", "-D",
                           str(self.dir / "data"), "-l", str(self.dir / "server.log"), "-o",
                           options], "pg_ctl start", check=False)
            if r.returncode == 0:
                self.port = port
                self.running = True
                return self
            if self.port or attempt + 1 == PG_START_ATTEMPTS:
                pytest.fail(f"PostgreSQL did not start on 127.0.0.1:{port}: {r.stdout}{r.stderr}"
                            f"\n{self.log_tail()}", pytrace=False)
        return self

    def stop(self, mode="fast"):
        """Stops the server (fast: connections are cut); its data stays."""
        if self.running:
            self._run([str(self.bin / "pg_ctl"), "stop", "-w", "-t", "60", "-m", mode, "-D",
                       str(self.dir / "data")], "pg_ctl stop")
            self.running = False

    def restart(self):
        return self.start()

    def url(self, db="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def sql(self, db, text):
        """Runs SQL in database db as the superuser; its output (psql -At)."""
        r = self._run([str(self.bin / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h",
                       str(self.dir), "-p", str(self.port), "-U", "postgres", "-d", db, "-c",
                       text], f"psql ({text[:60]})")
        return r.stdout

    def dump(self, db):
        """Every row of database db as text (pg_dump --data-only)."""
        tool = self.bin / "pg_dump"
        if not os.access(tool, os.X_OK):
            pytest.fail(f"PostgreSQL's pg_dump is not in {self.bin}", pytrace=False)
        r = self._run([str(tool), "--data-only", "-h", str(self.dir), "-p", str(self.port),
                       "-U", "postgres", "-d", db], f"pg_dump {db}")
        return r.stdout

    def create_database(self, prefix="osr_test"):
        """A new empty database; its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        self.sql("postgres", f"CREATE DATABASE {name}")
        return self.url(name)

    def close(self):
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


# -- the vault's catalog: SQLite or PostgreSQL -----------------------------------------------

VAULT_DB_ENV = "OSR_TEST_VAULT_DB"
VAULT_DB_BACKENDS = ("sqlite", "postgresql")


def add_vault_db_option(parser):
    """--vault-db=sqlite|postgresql (default: $OSR_TEST_VAULT_DB, else sqlite): the catalog
    of every vault the suite's fixtures start. Call from a conftest's pytest_addoption."""
    parser.addoption(
        "--vault-db", choices=VAULT_DB_BACKENDS, default=None,
        help=f"the vaults' catalog: sqlite (a file, the default) or postgresql (a database "
             f"of one PostgreSQL 15 server per session); default ${VAULT_DB_ENV}, else sqlite")


def vault_db_backend(config):
    """The backend chosen by --vault-db or OSR_TEST_VAULT_DB; anything else is a usage
    error (never a silent fallback to SQLite)."""
    chosen = config.getoption("--vault-db", default=None)
    if chosen is None:
        chosen = os.environ.get(VAULT_DB_ENV) or "sqlite"
    if chosen not in VAULT_DB_BACKENDS:
        raise pytest.UsageError(f"{VAULT_DB_ENV}={chosen!r}: expected one of "
                                f"{', '.join(VAULT_DB_BACKENDS)}")
    return chosen


def vault_db_report_header(config):
    return f"vault catalog: {vault_db_backend(config)} (--vault-db / {VAULT_DB_ENV})"


def _sql_literal(value):
    """value as a PostgreSQL literal (standard_conforming_strings, the default since 9.1)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        assert "\0" not in value, "PostgreSQL text cannot hold NUL"
        return "'" + value.replace("'", "''") + "'"
    raise AssertionError(f"no SQL literal for {type(value).__name__} {value!r}")


def _bind(sql, params):
    """sql with each '?' replaced by the literal of the next parameter (the tests' SQL has
    no '?' of its own)."""
    pieces = sql.split("?")
    assert len(pieces) == len(params) + 1, \
        f"{len(pieces) - 1} placeholders for {len(params)} parameters: {sql}"
    out = [pieces[0]]
    for value, piece in zip(params, pieces[1:]):
        out += [_sql_literal(value), piece]
    return "".join(out)


class Catalog:
    """The catalog of one vault, reached behind the vault's back (to plant a row the vault
    would refuse, or to read what it stored): a SQLite file, or a database of a PgServer.

    SQL uses '?' placeholders on both backends (bound by sqlite3, or quoted as literals for
    psql) and the schema's own names (docs/formats.md). Rows come back as tuples of Python
    values (int, str, None) on both."""

    def __init__(self, sqlite_path=None, pg=None, url=None):
        assert (sqlite_path is None) != (pg is None), "a SQLite path or a PgServer"
        self.sqlite_path = Path(sqlite_path) if sqlite_path is not None else None
        self.pg = pg
        self.url = url
        self.db_name = url.rsplit("/", 1)[1] if url else None

    @property
    def backend(self):
        return "sqlite" if self.pg is None else "postgresql"

    @property
    def db_arg(self):
        """What `osrd vault --db` / `osrd quickstart --db` takes."""
        return str(self.sqlite_path) if self.pg is None else self.url

    def __repr__(self):
        return f"Catalog({self.backend}: {self.db_arg})"

    def query(self, sql, *params):
        """The rows of one SELECT, a list of tuples."""
        if self.pg is None:
            import sqlite3
            with contextlib.closing(sqlite3.connect(self.sqlite_path, timeout=30)) as c:
                return [tuple(r) for r in c.execute(sql, params).fetchall()]
        import json
        # row_to_json keeps the columns' order and types (numbers, strings, null).
        text = self.pg.sql(self.db_name, "SELECT coalesce(json_agg(row_to_json(q)), '[]') "
                                         f"FROM ({_bind(sql, params)}) AS q")
        return [tuple(v for _, v in pairs)
                for pairs in json.loads(text, object_pairs_hook=list)]

    def execute(self, sql, *params):
        """Runs one INSERT, UPDATE or DELETE (committed); the number of rows it changed."""
        if self.pg is None:
            import sqlite3
            with contextlib.closing(sqlite3.connect(self.sqlite_path, timeout=30)) as c:
                with c:
                    return c.execute(sql, params).rowcount
        out = self.pg.sql(self.db_name, _bind(sql, params)).split()
        # psql prints the command tag: "UPDATE n", "DELETE n", "INSERT oid n".
        assert out and out[0] in ("INSERT", "UPDATE", "DELETE") and out[-1].isdigit(), \
            f"psql printed {out!r} for {sql}"
        return int(out[-1])

    def check_in_use(self, stray_sqlite_path):
        """None if the vault made its schema in this catalog (and, on PostgreSQL, no SQLite
        file at stray_sqlite_path: a vault that ignored --db); else what is wrong. Called
        once a vault is ready, so that a PostgreSQL pass never runs on SQLite unseen."""
        if self.pg is None:
            if not self.sqlite_path.exists():
                return f"the vault made no catalog at {self.sqlite_path}"
        elif stray_sqlite_path is not None and Path(stray_sqlite_path).exists():
            return f"the vault made {stray_sqlite_path} although its catalog is {self.url}"
        rows = self.query("SELECT value FROM meta WHERE key = ?", "schema_version")
        if len(rows) != 1:
            return f"{self}: no schema_version in table meta: {rows}"
        return None

    def dump(self):
        """Every row of every table as text (sqlite3's iterdump, or pg_dump --data-only):
        to check that a secret is stored nowhere."""
        if self.pg is None:
            import sqlite3
            with contextlib.closing(sqlite3.connect(self.sqlite_path, timeout=30)) as c:
                return "\n".join(c.iterdump())
        return self.pg.dump(self.db_name)


@pytest.fixture(scope="session")
def vault_pg_server(request):
    """The session's PostgreSQL server when the vaults' catalog is postgresql (else None).
    A server that cannot start fails the tests that need it; nothing skips."""
    if vault_db_backend(request.config) != "postgresql":
        yield None
        return
    pg = PgServer()
    try:
        pg.start()
        yield pg
    finally:
        pg.close()


@pytest.fixture
def new_catalog(request):
    """new_catalog(sqlite_path) -> Catalog: the catalog of one new vault. On SQLite the file
    at sqlite_path (made by the vault); on PostgreSQL a fresh database of the session's
    server, dropped at teardown."""
    made = []

    def make(sqlite_path):
        if vault_db_backend(request.config) == "sqlite":
            return Catalog(sqlite_path=sqlite_path)
        pg = request.getfixturevalue("vault_pg_server")
        catalog = Catalog(pg=pg, url=pg.create_database("osr_vault"))
        made.append(catalog)
        return catalog

    yield make
    for catalog in made:
        # The test's vaults have stopped; FORCE ends a connection one left behind.
        catalog.pg.sql("postgres", f"DROP DATABASE IF EXISTS {catalog.db_name} WITH (FORCE)")


# -- one osrd process ---------------------------------------------------------------------


class OsrdProcess:
    """One `osrd ...` process, started and watched by the test.

    Subclasses give osrd_args() (the arguments after the binary) and label (how failure
    messages name the process), and may override on_stdout_line(text) (called for each
    stdout line before 'osrd: ready', e.g. to parse listen addresses) and check_ready()
    (after 'osrd: ready': returns a failure message, or None if the startup lines are
    complete). stderr goes to log_path, appended to across restarts.
    """

    label = "osrd"
    ready_timeout = READY_TIMEOUT_S
    stop_timeout = STOP_TIMEOUT_S  # after SIGTERM, before SIGKILL (then a failure)

    def __init__(self, log_path):
        self.log_path = Path(log_path)
        self.proc = None
        self.stdout_lines = []
        self.exit_code = None
        self._drain = None
        self._log = None

    # -- hooks -----------------------------------------------------------------------

    def osrd_args(self):
        raise NotImplementedError

    def on_stdout_line(self, text):
        pass

    def check_ready(self):
        return None

    def osrd_env(self):
        """The environment of osrd (None: the test's own)."""
        return None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self):
        """Runs osrd and waits for 'osrd: ready' (at most ready_timeout seconds)."""
        binary = require_osrd()
        self.stdout_lines = []
        self.exit_code = None
        self._log = open(self.log_path, "ab")
        self._log.write(f"---- start {time.strftime('%H:%M:%S')}\n".encode())
        self._log.flush()
        cmd = [str(binary), *[str(a) for a in self.osrd_args()]]
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=self._log, env=self.osrd_env())
        except OSError as e:
            self._log.close()
            pytest.fail(f"cannot run {binary}: {e} (is it being rebuilt? set OSRD)",
                        pytrace=False)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + self.ready_timeout
        buf = b""
        ready = False
        try:
            while not ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abort()
                    pytest.fail(f"{self.label} printed no 'osrd: ready' within "
                                f"{self.ready_timeout}s\nstdout so far: {self.stdout_lines}\n"
                                f"stderr: {self.stderr()}")
                if not sel.select(timeout=left):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    self.proc.wait(timeout=STOP_TIMEOUT_S)
                    pytest.fail(f"{self.label} exited with {self.proc.returncode} before ready: "
                                f"{' '.join(cmd)}\nstdout: {self.stdout_lines}\n"
                                f"stderr: {self.stderr()}")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode(errors="replace").rstrip("\r")
                    self.stdout_lines.append(text)
                    self.on_stdout_line(text)
                    if text == "osrd: ready":
                        ready = True
                        break
        finally:
            sel.close()
        # Keep draining stdout so that a chatty daemon never blocks on a full pipe.
        self._drain = threading.Thread(target=self._drain_stdout, args=(buf,), daemon=True)
        self._drain.start()
        problem = self.check_ready()
        if problem is not None:
            self._abort()
            pytest.fail(problem)
        return self

    def _drain_stdout(self, rest):
        self.stdout_lines.extend(rest.decode(errors="replace").splitlines())
        for line in self.proc.stdout:
            self.stdout_lines.append(line.decode(errors="replace").rstrip("\n"))

    def _abort(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._close()

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM):
        """Stops with SIGTERM (or sig); returns the exit code. SIGKILL after stop_timeout
        seconds (a failure). A process a test left stopped (SIGSTOP) gets SIGCONT first."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
                self.exit_code = self.proc.returncode
                self._close()
                pytest.fail(f"{self.label} did not stop within {self.stop_timeout}s of {sig!r}; "
                            f"killed with SIGKILL\nstderr: {self.stderr()}")
        self.exit_code = self.proc.returncode
        self._close()
        return self.exit_code

    def stop_clean(self):
        """SIGTERM and assert a clean exit (status 0)."""
        code = self.stop()
        assert code == 0, f"{self.label} exited with {code} after SIGTERM\nstderr: {self.stderr()}"

    def kill9(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self.exit_code = self.proc.returncode if self.proc else None
        self._close()

    def restart(self):
        """Starts the same process again (same arguments, same state)."""
        assert not self.alive(), f"{self.label} is still running"
        return self.start()

    def _close(self):
        if self._drain is not None:
            self._drain.join(timeout=5)
            self._drain = None
        with contextlib.suppress(Exception):
            self.proc.stdout.close()
        with contextlib.suppress(Exception):
            self._log.close()

    def stderr(self):
        """The last 6000 characters of the process's stderr log."""
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""


def stop_all_clean(procs):
    """Teardown: every process still running gets SIGTERM and must exit 0 (else the test
    fails, naming each one that did not)."""
    problems = []
    for p in procs:
        if p.alive():
            code = p.stop()
            if code != 0:
                problems.append(f"{p.label} exited with {code} on SIGTERM at teardown\n"
                                f"{p.stderr()}")
    if problems:
        pytest.fail("\n".join(problems))


# -- waiting and seeds ----------------------------------------------------------------------


def wait_for(pred, timeout, what, interval=0.05, detail=None):
    """Polls pred() until it returns a truthy value; fails after timeout seconds
    (with detail(), if given, in the message)."""
    deadline = time.monotonic() + timeout
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            extra = f"\nlast seen: {detail()}" if detail is not None else ""
            pytest.fail(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def seed_from_env():
    """OSR_TEST_SEED, or a random seed (failure messages name it, so that
    OSR_TEST_SEED=N reproduces the run's data)."""
    env = os.environ.get("OSR_TEST_SEED")
    return int(env) if env else random.randrange(1 << 30)


# -- NBD clients --------------------------------------------------------------------------


def connect(uri, handle_name, structured=True, strict=True, meta=False, opt_mode=False):
    """A libnbd handle connected to uri (strict=False lets bad requests reach the server,
    meta=True asks for base:allocation, opt_mode=True stops in option negotiation)."""
    lib = require_libnbd()
    h = lib.NBD()
    h.set_handle_name(handle_name)
    if not structured:
        h.set_request_structured_replies(False)
    if meta:
        h.add_meta_context(lib.CONTEXT_BASE_ALLOCATION)
    if not strict:
        h.set_strict_mode(0)
    if opt_mode:
        h.set_opt_mode(True)
    h.connect_uri(uri)
    return h


def close_handle(h):
    with contextlib.suppress(Exception):
        h.shutdown()
    with contextlib.suppress(Exception):
        h.close()


def read_handle(h, size=None, what="export"):
    """The whole export of handle h, in 4 MiB requests; checks its size unless None."""
    total = h.get_size()
    if size is not None:
        assert total == size, f"{what}: export size {total}, expected {size}"
    out = bytearray()
    for off in range(0, total, READ_CHUNK):
        out += h.pread(min(READ_CHUNK, total - off), off)
    return bytes(out)


def write_random(uri, model, rng, n, max_len, handle_name="pytest"):
    """n writes of 1..max_len random bytes at random offsets through libnbd, flushed, each
    applied to the model (a bytearray of the export)."""
    h = connect(uri, handle_name)
    try:
        for _ in range(n):
            length = rng.randrange(1, max_len)
            off = rng.randrange(0, len(model) - length)
            data = rng.randbytes(length)
            h.pwrite(data, off)
            model[off:off + length] = data
        h.flush()
    finally:
        close_handle(h)


def read_uri(uri, size=None, handle_name="pytest"):
    """The whole export at uri, over a fresh connection."""
    h = connect(uri, handle_name)
    try:
        return read_handle(h, size, uri)
    finally:
        close_handle(h)


# -- bytes and random requests ------------------------------------------------------------


def first_difference(a, b):
    if len(a) != len(b):
        return f"sizes differ: {len(a)} != {len(b)}"
    step = 64 * KIB
    for off in range(0, len(a), step):
        if a[off:off + step] != b[off:off + step]:
            for i in range(off, min(off + step, len(a))):
                if a[i] != b[i]:
                    return f"first difference at byte {i}: {a[i]:#04x} != {b[i]:#04x}"
    return None


def assert_same_bytes(got, want, what):
    if got == want:
        return
    diff = first_difference(got, want)
    assert diff is None, f"{what}: {diff}"


def random_op(rng, size, max_len=256 * KIB, weights=(8, 1, 1)):
    """(kind, offset, length, data) within a disk of size bytes: unaligned offsets and
    lengths mostly; kinds write, zero (WRITE_ZEROES) and trim, the latter two read as
    zeros afterwards."""
    kind = rng.choices(["write", "zero", "trim"], weights=weights)[0]
    if rng.random() < 0.3:  # aligned, 4 KiB multiples
        length = rng.randrange(1, max_len // 4096 + 1) * 4096
        offset = rng.randrange(0, (size - length) // 4096 + 1) * 4096
    else:
        length = rng.randrange(1, max_len + 1)
        offset = rng.randrange(0, size - length + 1)
    data = rng.randbytes(length) if kind == "write" else None
    return kind, offset, length, data


def apply_op(h, kind, offset, length, data):
    """Sends one request over libnbd handle h and waits for its reply."""
    if kind == "write":
        h.pwrite(data, offset)
    elif kind == "zero":
        h.zero(length, offset)
    elif kind == "trim":
        h.trim(length, offset)
    else:
        raise AssertionError(kind)


def apply_model(disk_bytes, kind, offset, length, data):
    """Applies one request to a bytearray model of the disk."""
    if kind == "write":
        disk_bytes[offset:offset + length] = data
    else:
        disk_bytes[offset:offset + length] = bytes(length)


# -- Certificates and credentials (docs/security.md) --------------------------------------


def make_certs(directory, *names):
    """A private CA in `directory` (once) and a certificate per name, made by `osrd certs`.
    Returns {name: (cert, key)} plus "ca": path."""
    directory = Path(directory)
    args = [str(require_osrd()), "certs", "--dir", str(directory)]
    for n in names:
        args += ["--name", n]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"osrd certs: {proc.returncode}: {proc.stderr}"
    out = {"ca": str(directory / "ca.pem")}
    for n in names:
        out[n] = (str(directory / f"{n}.pem"), str(directory / f"{n}.key"))
    return out


def tls_client_context(ca, cert=None, key=None):
    """An ssl.SSLContext that trusts `ca` and presents cert/key. osr checks the peer's
    certificate names (CN) itself, not host names, so the host name check is off here and
    tests that care read the peer's CN."""
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


def token_env(token_file):
    """The environment for `osr` with the token in token_file (OSR_TOKEN_FILE)."""
    env = dict(os.environ)
    env.pop("OSR_TOKEN", None)
    env["OSR_TOKEN_FILE"] = str(token_file)
    env["OSR_CONFIG"] = str(Path(token_file).parent / "osr-cli-config.json")
    return env


# -- QEMU guests ----------------------------------------------------------------------------


def build_test_guest():
    """The test guest (tests/vm), built beside the osrd binary under test (build/guest):
    idempotent, and under a second once its cache is there. Returns its folder."""
    require_tool("qemu-system-x86_64")
    out = require_osrd().parent / "guest"
    script = REPO_ROOT / "tests" / "vm" / "build_guest.sh"
    p = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True,
                       timeout=600, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"{script} {out}: {p.returncode}\n{p.stderr[-2000:]}"
    for f in ("vmlinuz", "initramfs.cpio.gz"):
        assert (out / f).is_file(), f"the guest build made no {out / f}"
    return out


def guest_archive(text):
    """The test guest's disk format (tests/vm): a tar archive holding hello.txt with `text`."""
    data = text.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        info.mode = 0o644
        t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def qemu_pids(marker):
    """The running qemu processes with `marker` (a path: a test's folder, a VM's run folder)
    in an argument."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"qemu" in argv[0] and any(str(marker).encode() in a for a in argv[1:]):
            out.append(int(d.name))
    return out


def kill_stray_qemus(marker):
    """SIGKILLs every qemu with `marker` in an argument; returns their pids (a test's
    teardown fails when there were any)."""
    stray = qemu_pids(marker)
    for pid in stray:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return stray
