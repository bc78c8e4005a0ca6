"""Real servers on loopback for the remote-zoo tests (issue #16): nginx over HTTP, moto's S3 emulator.

    with nginx_serving(folder) as web:      # Debian's nginx, static files, HTTP Range requests
        web.url                             # "http://127.0.0.1:PORT/" -> folder/
        web.bytes_sent(), web.requests()    # parsed from the server's own access log

    with s3_serving(folder) as s3:          # moto's standalone S3 server (an emulator), in its own process
        s3.url                              # "s3://zoo/" -> every file of folder, keys = relative paths
        s3.storage_options                  # for s3fs / fsspec: explicit test credentials and endpoint

Both are real processes on 127.0.0.1 on a free port, started on entry and stopped on exit; nothing
needs root or writes outside a temporary directory, and no environment variable is set.
nginx reads `folder` live (files written after start are served); the S3 bucket is a copy made on
entry (call `S3Server.upload` for files added later).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

HOST = "127.0.0.1"
START_TIMEOUT = 30.0  # seconds for a server to answer on its port
STOP_TIMEOUT = 10.0

# what the access log records, one request a line; $http_range comes last since a multi-range
# header may hold spaces ("-" when the request had no Range header)
LOG_FORMAT = "$request_method $request_uri $status $body_bytes_sent $request_time $http_range"

READY_PATH = "/.servers-ready"  # answered by nginx itself (204), left out of the access log
SYNC_PATH = "/.servers-sync"  # answered by nginx itself (204), logged, left out of requests()

NGINX_MISSING = (
    "nginx is not installed: the HTTP tests serve files from Debian's nginx on loopback; install it with "
    "`apt-get install -y --no-install-recommends nginx-light` (or `nginx`; .ci/run installs it)"
)


def free_port() -> int:
    """A TCP port free on loopback right now (the caller retries if another process takes it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# requests of our own to loopback never go through a proxy set in the environment
_LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def urlopen(url: str | urllib.request.Request, timeout: float = 10):
    """urllib's urlopen, with no proxy."""
    return _LOOPBACK.open(url, timeout=timeout)


def _answers(url: str) -> bool:
    try:
        with urlopen(url, timeout=2) as r:
            r.read()
        return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer (a 404 for "/") means the server is up
    except OSError:
        return False


def _wait_until_up(proc: subprocess.Popen, url: str, log: Path, what: str) -> None:
    """Return once `url` answers; else stop `proc` and raise with the end of its log."""
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with code {proc.returncode} on start:\n{_tail(log)}")
            if _answers(url):
                return
            time.sleep(0.05)
        raise RuntimeError(f"{what} did not answer on {url} within {START_TIMEOUT:.0f} s:\n{_tail(log)}")
    except BaseException:  # (a Ctrl-C too: the server is in its own session and would outlive us)
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    """Stop a server started by us: `first` (graceful), then SIGTERM, then SIGKILL."""
    for sig in dict.fromkeys((first, signal.SIGTERM, signal.SIGKILL)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
            return
        except subprocess.TimeoutExpired:
            continue


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"(no {path.name})"


@contextlib.contextmanager
def _workdir(workdir: Path | None, prefix: str) -> Iterator[Path]:
    if workdir is not None:
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir.resolve()
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------- nginx


@dataclass
class NginxServer:
    folder: Path
    port: int
    workdir: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def url(self) -> str:
        """The folder's root: f"{url}a/b.parquet" is folder/a/b.parquet."""
        return f"http://{HOST}:{self.port}/"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def sync(self) -> None:
        """Wait until every request answered so far is in the access log. nginx writes a request's
        line (unbuffered) just after its last byte is sent, so a client can be done before the line
        is; one worker handles everything in order, so once a marker request sent now is logged,
        all earlier ones are too."""
        self._syncs = getattr(self, "_syncs", 0) + 1
        marker = f"{SYNC_PATH}?{self._syncs}"
        urlopen(self.url.rstrip("/") + marker).close()
        deadline = time.monotonic() + 10
        while marker not in (self.access_log.read_text() if self.access_log.exists() else ""):
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not log {marker} in {self.access_log}")
            time.sleep(0.005)

    def requests(self) -> list[dict]:
        """The requests served so far (since the last reset_log), oldest first: method, uri, status,
        bytes (body bytes sent), seconds, range (the Range header, or None)."""
        self.sync()
        out = []
        for line in self.access_log.read_text().splitlines():
            parts = line.split(" ", 5)
            if len(parts) < 6 or parts[1].startswith(SYNC_PATH):
                continue
            method, uri, status, sent, seconds, rng = parts
            out.append(
                {
                    "method": method,
                    "uri": uri,
                    "status": int(status),
                    "bytes": int(sent),
                    "seconds": float(seconds),
                    "range": None if rng == "-" else rng,
                }
            )
        return out

    def bytes_sent(self, prefix: str = "") -> int:
        """Body bytes sent so far, over the requests whose URI starts with `prefix` ("/a/" for one folder)."""
        return sum(r["bytes"] for r in self.requests() if r["uri"].startswith(prefix))

    def reset_log(self) -> None:
        """Forget the requests so far (nginx keeps appending, O_APPEND, to the same open file)."""
        self.sync()
        with open(self.access_log, "r+") as f:
            f.truncate(0)


def _nginx_conf(folder: Path, workdir: Path, port: int) -> str:
    w = workdir
    # as root, nginx's workers would switch to `nobody`, who cannot read a 0700 pytest tmp dir;
    # as anyone else the directive is ignored (with a warning), so only write it for root
    user = "user root root;" if os.geteuid() == 0 else ""
    mime = "include /etc/nginx/mime.types;" if Path("/etc/nginx/mime.types").is_file() else ""
    return f"""\
# written by tests/servers.py: a static file server for one folder, everything under {w}
daemon off;
master_process on;
worker_processes 1;         # one worker, so requests are logged in order (NginxServer.sync)
{user}
pid {w}/nginx.pid;
error_log {w}/error.log info;
events {{ worker_connections 512; }}
http {{
    {mime}
    default_type application/octet-stream;
    log_format zoo '{LOG_FORMAT}';
    access_log {w}/access.log zoo;
    client_body_temp_path {w}/tmp/body;
    proxy_temp_path {w}/tmp/proxy;
    fastcgi_temp_path {w}/tmp/fastcgi;
    uwsgi_temp_path {w}/tmp/uwsgi;
    scgi_temp_path {w}/tmp/scgi;
    sendfile on;
    gzip off;              # byte ranges must be of the file's own bytes
    autoindex off;
    server_tokens off;
    keepalive_timeout 30s;
    keepalive_requests 100000;
    server {{
        listen {HOST}:{port};
        server_name localhost;
        root {folder};
        location / {{ }}
        location = {READY_PATH} {{ access_log off; return 204; }}  # the start-up probe, not logged
        location = {SYNC_PATH} {{ return 204; }}  # NginxServer.sync's marker, logged
    }}
}}
"""


@contextlib.contextmanager
def nginx_serving(folder: str | os.PathLike, *, workdir: Path | None = None) -> Iterator[NginxServer]:
    """Debian's nginx serving `folder` read-only on http://127.0.0.1:PORT/ (free port) until exit.

    Its config, pid file and logs are in `workdir` (a temporary directory removed on exit if not given).
    Fails (not skips) with the apt-get line when nginx is not installed."""
    nginx = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if os.access(p, os.X_OK)), None
    )
    if nginx is None:
        raise RuntimeError(NGINX_MISSING)
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise NotADirectoryError(folder)
    with _workdir(workdir, "nginx-") as w:
        (w / "tmp").mkdir(exist_ok=True)
        for attempt in range(5):
            port = free_port()
            conf = w / "nginx.conf"
            conf.write_text(_nginx_conf(folder, w, port))
            # -e: the error log before the config is read (Debian's default is stderr, but be explicit)
            with open(w / "stdout.log", "ab") as out:
                proc = subprocess.Popen(
                    [nginx, "-p", str(w), "-c", str(conf), "-e", str(w / "error.log")],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # a Ctrl-C in pytest does not reach it; we stop it below
                )
            try:
                _wait_until_up(proc, f"http://{HOST}:{port}{READY_PATH}", w / "error.log", "nginx")
                break
            except RuntimeError:
                if attempt < 4 and "Address already in use" in _tail(w / "error.log"):
                    (w / "error.log").unlink(missing_ok=True)
                    continue  # another process took the port between free_port() and bind
                raise
        server = NginxServer(folder=folder, port=port, workdir=w, proc=proc)
        try:
            yield server
        finally:
            _stop(proc, first=signal.SIGQUIT)  # SIGQUIT: graceful shutdown, lets requests finish


# --------------------------------------------------------------------------------------- S3 (moto)

_WERKZEUG_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<uri>\S+) HTTP/[\d.]+" (?P<status>\d{3}) ')
CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
REGION = "us-east-1"


@dataclass
class S3Server:
    folder: Path
    bucket: str
    port: int
    workdir: Path
    proc: subprocess.Popen = field(repr=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The bucket's root, "s3://zoo/": f"{url}a/b.parquet" is folder/a/b.parquet."""
        return f"s3://{self.bucket}/"

    @property
    def storage_options(self) -> dict:
        """For s3fs.S3FileSystem(**opts) / fsspec.filesystem("s3", **opts) / pandas, pyarrow, datasets."""
        return {
            "key": CREDENTIALS["aws_access_key_id"],
            "secret": CREDENTIALS["aws_secret_access_key"],
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
        }

    @property
    def server_log(self) -> Path:
        """moto's own log (werkzeug): one line per request with method, path and status, no byte counts."""
        return self.workdir / "moto.log"

    def requests(self) -> list[dict]:
        """The requests so far from moto's log (method, uri, status; moto logs no byte counts),
        the start-up probes left out."""
        out = []
        text = self.server_log.read_text(errors="replace") if self.server_log.exists() else ""
        for line in text.splitlines():
            m = _WERKZEUG_LINE.search(line)
            if m and not m["uri"].startswith("/moto-api/"):
                out.append({"method": m["method"], "uri": m["uri"], "status": int(m["status"])})
        return out

    def client(self):
        """A boto3 S3 client for this server (explicit credentials, nothing read from the environment)."""
        import boto3

        session = boto3.session.Session(region_name=REGION, **CREDENTIALS)
        return session.client("s3", endpoint_url=self.endpoint_url)

    def upload(self, folder: str | os.PathLike | None = None, prefix: str = "") -> int:
        """Put every file under `folder` (default: the served folder) into the bucket, keys = prefix +
        relative POSIX paths. Returns the number of files."""
        folder = Path(folder or self.folder)
        client = self.client()
        n = 0
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            client.upload_file(str(path), self.bucket, prefix + path.relative_to(folder).as_posix())
            n += 1
        return n


@contextlib.contextmanager
def s3_serving(
    folder: str | os.PathLike, bucket: str = "zoo", *, workdir: Path | None = None
) -> Iterator[S3Server]:
    """moto's standalone S3 server (an emulator, in-memory, in its own process) on a free loopback port,
    with bucket `bucket` holding a copy of every file of `folder`; stopped on exit."""
    folder = Path(folder).resolve()
    if not folder.is_dir():
        raise NotADirectoryError(folder)
    with _workdir(workdir, "moto-") as w:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MOTO_"))}
        for attempt in range(5):
            port = free_port()
            log = w / "moto.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=w,
                    start_new_session=True,
                )
            try:
                _wait_until_up(proc, f"http://{HOST}:{port}/moto-api/data.json", log, "moto_server")
                break
            except RuntimeError:
                if attempt < 4 and "Address already in use" in _tail(log):
                    continue
                raise
        server = S3Server(folder=folder, bucket=bucket, port=port, workdir=w, proc=proc)
        try:
            server.client().create_bucket(Bucket=bucket)
            server.upload()
            yield server
        finally:
            _stop(proc)
