"""Serving the dashboard: loopback by default; when exposed, a login that checks user name and
password in constant time and slows down a client after each failed attempt, and optional TLS.

The runs are fixed when the server starts; a URL can only choose a run by its listed name
(`?run=NAME`) and among that run's own heads, methods and colour modes (viz.data.url_state),
never a path. Widget callbacks (search, head
changes, clicks) run on Panel's thread pool, off the event loop that serves page loads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path

from pipeline.errors import QkatlasError

LOOPBACK = "127.0.0.1"
DEFAULT_USER = "qkatlas"
SERVER_THREADS = 4  # Panel's pool for widget callbacks; page loads stay on the event loop
log = logging.getLogger("qkatlas.serve")


class ServeError(QkatlasError, ValueError):
    """A run that cannot be served (no projections, not a run) or a bad option."""


def is_loopback(address: str) -> bool:
    if address in ("localhost", ""):
        return address == "localhost"
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def exposure_warnings(address: str, auth: bool, tls: bool) -> list[str]:
    """What a user should know before serving on `address`."""
    if is_loopback(address):
        return []
    if not auth:
        return [f"serving on {address} without --basic-auth: anyone who can reach this port sees the run"]
    if not tls:
        return [(f"serving on {address} over plain HTTP: the password travels in clear text; add --tls-cert and "
                 "--tls-key (or put a TLS proxy in front)")]
    return []


def check_run(run):
    """The opened run (`run`: a path or URL, or a run object), checked to have something to show;
    errors say which command to run."""
    from pipeline.store import StoreError, open_run

    if isinstance(run, str):
        url = run
        try:
            run = open_run(url)
        except (StoreError, FileNotFoundError) as error:
            raise ServeError(str(error)) from None
    else:
        url = getattr(getattr(run, "dir", None), "url", repr(run))
    if run.projections().empty:
        raise ServeError(f"{url} has no projections yet; run: qkatlas reduce {url} --method umap,pca")
    return run


def run_name(url: str) -> str:
    """A run's listed name: the last part of its path or URL."""
    return url.rstrip("/").rsplit("/", 1)[-1] or url


def runs_in(directory: str) -> list[str]:
    """The runs (with projections) directly inside local `directory`, newest name first (nightly
    runs named by date list the latest first); [] when `directory` holds none."""
    from pipeline.store import StoreError, open_run

    found = []
    for child in sorted(Path(directory).expanduser().iterdir(), reverse=True):
        if not child.is_dir():
            continue
        try:
            if not open_run(str(child)).projections().empty:
                found.append(str(child))
        except (StoreError, FileNotFoundError, OSError):
            continue
    return found


def run_table(sources) -> dict:
    """name -> opened run, for `sources`: runs (paths, URLs or opened runs) and local directories
    of runs. Names are the runs' directory names, unique, so that a URL names a run by that name
    only, never by a path."""
    from pipeline.store import StoreError, open_run

    table = {}
    for source in sources:
        if isinstance(source, str):
            try:
                open_run(source)
                urls = [source]
            except (StoreError, FileNotFoundError):
                urls = runs_in(source) if Path(source).expanduser().is_dir() else []
                if not urls:
                    raise ServeError(f"{source} is neither a run nor a directory of runs with projections; give "
                                     "run directories (see `qkatlas reduce`) or a folder holding them") from None
        else:
            urls = [source]
        for url in urls:
            run = check_run(url)
            name = run_name(getattr(getattr(run, "dir", None), "url", None) or str(url))
            if name in table:
                raise ServeError(f"two runs are named {name!r} ({url} and another); serve them from differently "
                                 "named directories")
            table[name] = run
    return table


# --- credentials ---------------------------------------------------------------------------


def looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or os.sep in value or value.lower().endswith(".json")


def load_credentials(basic_auth: str, user: str = DEFAULT_USER) -> dict[str, str]:
    """user -> password. `basic_auth` is a password (for `user`) or, when it looks like a path,
    a JSON file of {"user": "password", ...}, which must then exist and be readable."""
    if not looks_like_path(basic_auth):
        return {user: basic_auth}
    path = Path(basic_auth).expanduser()
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServeError(f"--basic-auth {basic_auth} looks like a file but there is none; give an existing JSON file "
                         'of {"user": "password"} (a password with "/" in it belongs in such a file)') from None
    except (OSError, UnicodeDecodeError) as error:
        raise ServeError(f"--basic-auth {basic_auth}: cannot read it ({error}); give a readable JSON file of "
                         '{"user": "password"}') from None
    except json.JSONDecodeError as error:
        raise ServeError(f"--basic-auth {basic_auth} is not valid JSON (line {error.lineno}: {error.msg}); it must "
                         'hold {"user": "password", ...}') from None
    if not isinstance(table, dict) or not table or not all(
            isinstance(name, str) and isinstance(secret, str) and name and secret for name, secret in table.items()):
        raise ServeError(f"--basic-auth {basic_auth} must hold a non-empty JSON object of "
                         '{"user": "password"} with non-empty strings')
    return table


def credentials_match(credentials: dict[str, str], user: str, password: str) -> bool:
    """Both user name and password checked, each with a constant-time comparison, against every
    entry, so that the time taken does not tell which user names exist."""
    found = False
    for name, secret in credentials.items():
        same_name = hmac.compare_digest(name.encode(), user.encode())
        same_secret = hmac.compare_digest(secret.encode(), password.encode())
        found |= same_name & same_secret
    return found


class LoginThrottle:
    """Failed logins per client address: after n failures in a row, the client's next attempt is
    checked only min(cap, base * 2**(n - 1)) seconds after the last failure; one client's attempts
    are checked one at a time, so parallel guesses queue. A success, or `forget_after` seconds of
    quiet, clears the count."""

    def __init__(self, base: float = 0.25, cap: float = 30.0, forget_after: float = 900.0):
        self.base, self.cap, self.forget_after = base, cap, forget_after
        self._failures: dict[str, tuple[int, float]] = {}  # client -> (failures in a row, monotonic time of last)
        self._turns: dict[str, asyncio.Lock] = {}

    def wait(self, client: str) -> float:
        """Seconds before `client`'s next attempt may be checked."""
        failures, last = self._failures.get(client, (0, 0.0))
        now = time.monotonic()
        if not failures or now - last > self.forget_after:
            return 0.0
        return max(0.0, last + min(self.cap, self.base * 2 ** (failures - 1)) - now)

    def record(self, client: str, ok: bool) -> None:
        if ok:
            self._failures.pop(client, None)
            return
        failures, last = self._failures.get(client, (0, 0.0))
        now = time.monotonic()
        self._failures[client] = (1 if now - last > self.forget_after else failures + 1, now)
        if len(self._failures) > 10_000:
            for other, (_, when) in list(self._failures.items()):
                if now - when > self.forget_after:
                    self._failures.pop(other)
                    self._turns.pop(other, None)

    @contextlib.asynccontextmanager
    async def turn(self, client: str):
        """Wait for `client`'s turn, then its delay; the attempt runs inside."""
        lock = self._turns.setdefault(client, asyncio.Lock())
        async with lock:
            await asyncio.sleep(self.wait(client))
            yield


def auth_provider(credentials: dict[str, str], throttle: LoginThrottle):
    """Panel's login page and cookies, with `credentials_match` and `throttle` in front."""
    from panel.auth import BasicAuthProvider, BasicLoginHandler

    class LoginHandler(BasicLoginHandler):
        def _validate(self, username, password):
            ok = credentials_match(credentials, username, password)
            throttle.record(self.request.remote_ip, ok)
            return ok

        async def post(self):
            async with throttle.turn(self.request.remote_ip):
                super().post()

    class Provider(BasicAuthProvider):
        @property
        def login_handler(self):
            _ = super().login_handler  # sets the login page's endpoint and template on Panel's handler
            return LoginHandler

    return Provider()


# --- the server ----------------------------------------------------------------------------


def check_tls(cert: str | None, key: str | None) -> dict:
    """Bokeh's server options for HTTPS, after checking that the pair loads."""
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise ServeError("--tls-cert and --tls-key go together: give both (a PEM certificate and its private key)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or error
        raise ServeError(f"--tls-cert {cert} / --tls-key {key}: cannot load them ({reason}); give a PEM certificate "
                         "and its matching private key") from None
    return {"ssl_certfile": cert, "ssl_keyfile": key}


def _bind_error(error: OSError, address: str, port: int) -> ServeError:
    if error.errno == errno.EADDRINUSE:
        return ServeError(f"port {port} on {address} is already in use (another server?); choose another with --port")
    if error.errno == errno.EACCES:
        return ServeError(f"not allowed to listen on port {port} ({error.strerror}); choose a port above 1023")
    if isinstance(error, socket.gaierror) or error.errno == errno.EADDRNOTAVAIL:
        return ServeError(f"cannot listen on --address {address} ({error.strerror}); give an address of this machine "
                          "(127.0.0.1, or 0.0.0.0 for every interface)")
    return ServeError(f"cannot listen on {address}:{port} ({error.strerror or error})")


def make_server(run, port: int = 5006, address: str = LOOPBACK, basic_auth: str | None = None,
                auth_user: str = DEFAULT_USER, tls_cert: str | None = None, tls_key: str | None = None,
                warm: bool = True, throttle: LoginThrottle | None = None):
    """A Panel server (not started; on this thread's IOLoop) for `run` (a path or URL, or an opened
    run), or for several: a list of runs and directories of runs (`run_table`), with a run picker
    in the page. `basic_auth`: a password for `auth_user`, or a JSON file of user -> password (see
    `load_credentials`).

    What the process holds once the server is built (the libraries, the run's tables) and once
    its warm-up is done lives as long as the server: `gc.freeze` keeps Python's full collections
    from walking it again and again, each a 0.25-0.5 s pause in the middle of some user's click
    (`qkatlas bench browser`); sessions' own objects are collected as before."""
    import panel as pn
    from bokeh.settings import settings

    from viz.data import shared_run_data
    from viz.views import app

    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port} is not a port number; give one from 1 to 65535 (default 5006)")
    extra = check_tls(tls_cert, tls_key)
    if basic_auth:
        extra.update(auth_provider=auth_provider(load_credentials(basic_auth, auth_user), throttle or LoginThrottle()),
                     cookie_secret=secrets.token_hex(32))
    runs = run_table(run) if isinstance(run, (list, tuple)) else {"": check_run(run)}
    only = next(iter(runs.values()))
    page = (lambda: app(runs)) if len(runs) > 1 else (lambda: app(only))  # a picker for several runs only
    origins = [f"{address}:{port}"] + ([f"localhost:{port}", f"127.0.0.1:{port}"] if is_loopback(address) else [])
    try:
        server = pn.serve({"/": page}, port=port, address=address, websocket_origin=origins, show=False,
                          start=False, title="qkatlas", verbose=False, **extra)
    except OSError as error:
        raise _bind_error(error, address, port) from None
    if pn.config.nthreads is None:  # read when events arrive, so set once the server exists
        pn.config.nthreads = SERVER_THREADS
    settings.perform_document_validation.set_value(False)  # developer checks of every model, on every page load
    gc.freeze()
    if warm:
        threading.Thread(target=lambda: ([warm_up(shared_run_data(each)) for each in runs.values()], gc.freeze()),
                         daemon=True, name="qkatlas-warm").start()
    return server


def warm_up(data) -> None:
    """Build what sessions share before the first one asks: datashader's compiled pipelines, the
    matrix every session opens on, the search index and the head similarity; a failure is left
    to the view that needs them."""
    from viz.emphasis import warm_renderers
    from viz.matrix_view import shared_mosaic

    try:
        warm_renderers(data)
        shared_mosaic(data, data.methods[0], data.dims(data.methods[0])[0], "query / key", "", None)
        _ = data.vocabulary
        data.head_similarity()
    except Exception as error:  # noqa: BLE001  (reported once here, and again by the view)
        log.warning("qkatlas: warming up the run's caches failed: %s", error)
