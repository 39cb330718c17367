"""Hostile and careless input: a search that cannot stall the server, nothing exposed by default,
a login that checks both fields and slows guessing down, and one line (exit 2, no traceback) for
every user error."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from typer.testing import CliRunner
from viz_fixtures import text_run  # noqa: F401  (fixture)

from workflows.cli import app

runner = CliRunner()
pytestmark = pytest.mark.timeout(300)


def invoke(args: list[str]):
    return runner.invoke(app, args)


def assert_one_line_error(result, *words: str) -> str:
    """Exit 2, no exception but the exit, and exactly one line of error naming `words`."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.rstrip().endswith(errors[0]), result.output
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- search ------------------------------------------------------------------------------


def million_tokens():
    """1 M tokens with long words and a non-ASCII one: Python's regex engine needs minutes for
    `((\\w+)+)+!` on them (pandas hands `\\w` on non-ASCII text to it)."""
    from workflows.bench.serve import SyntheticRun

    return SyntheticRun(1_000_000).tokens()


def test_pathological_regex_on_a_million_tokens_returns_within_a_second():
    from workflows.bench.serve import PATHOLOGICAL
    from viz.data import search_tokens

    tokens = million_tokens()
    began = time.perf_counter()
    matches = search_tokens(tokens, PATHOLOGICAL)  # the token index is built inside: a cold search
    assert time.perf_counter() - began < 1.0 and len(matches) == 0
    assert len(search_tokens(tokens, r"re:\w+s")) == (tokens["token"] == "attentions").sum()


def test_invalid_too_long_and_unsupported_patterns_say_why():
    from viz.data import MAX_PATTERN_CHARS, SearchError, search_tokens

    tokens = million_tokens().head(1000)
    with pytest.raises(SearchError, match=r"re:\( is not a pattern RE2 accepts \(missing \)"):
        search_tokens(tokens, "re:(")
    with pytest.raises(SearchError, match="backreferences"):
        search_tokens(tokens, r"re:(a)\1")
    with pytest.raises(SearchError, match=f"at most {MAX_PATTERN_CHARS}"):
        search_tokens(tokens, "re:" + "a" * (MAX_PATTERN_CHARS + 1))


def test_a_search_that_runs_out_of_time_stops_with_a_message():
    import pandas as pd

    from viz.data import SearchError, search_tokens

    tokens = pd.DataFrame({"token": [f"word{i}" for i in range(100_000)]})
    with pytest.raises(SearchError, match="stopped after"):
        search_tokens(tokens, "re:w.*", time_limit=0.0)


def test_the_count_pane_shows_an_invalid_pattern_instead_of_failing():
    import holoviews as hv

    from workflows.bench.serve import SyntheticRun
    from viz.data import RunData
    from viz.views import Dashboard

    hv.extension("bokeh", logo=False)
    dashboard = Dashboard(RunData(SyntheticRun(2_000)))
    dashboard.search_w.value = "re:("
    assert "not a pattern RE2 accepts" in dashboard.count_pane.object and len(dashboard.matches) == 0
    dashboard.search_w.value = "cat"
    assert "matches" in dashboard.count_pane.object and len(dashboard.matches) > 0


@pytest.fixture(scope="module")
def million_token_server():
    """`qkatlas serve`'s server (make_server) over a synthetic run of 1 M tokens, in a child process."""
    from workflows.bench.serve import BenchServer

    server = BenchServer(1_000_000, baseline=False)
    yield server
    server.stop()


def test_a_pathological_search_does_not_stall_another_clients_page_load(million_token_server):
    from workflows.bench.serve import PATHOLOGICAL, page_load, send_search

    server = million_token_server
    alone = page_load(server.url, timeout=30)
    session, sent = send_search(server.url, PATHOLOGICAL)
    time.sleep(0.3)  # the server has the search
    during = page_load(server.url, timeout=30)
    seconds, count = server.search_answer(sent, timeout=30)
    session.close()
    # 2 s on a quiet machine; on a loaded one (other jobs on the 2 cores) the page alone is
    # slower, and a search that held the loop would still add seconds on top of that
    assert during < max(2.0, 1.5 * alone), f"page load {during:.2f} s during the search ({alone:.2f} s alone)"
    assert seconds < 1.0 and "0 matches" in count, (seconds, count)  # searched and the head re-drawn


def test_the_served_dashboard_reports_an_invalid_pattern(million_token_server):
    from workflows.bench.serve import send_search

    session, sent = send_search(million_token_server.url, "re:(")
    seconds, count = million_token_server.search_answer(sent, timeout=30)
    session.close()
    assert seconds < 30 and "not a pattern RE2 accepts" in count


# --- nothing exposed by default --------------------------------------------------------------


def test_dask_dashboard_binds_loopback_unless_configured_and_warns_then():
    from workflows.cluster import dashboard_bind

    assert dashboard_bind(":8787") == ("127.0.0.1:8787", None)
    assert dashboard_bind(":0") == ("127.0.0.1:0", None)
    assert dashboard_bind("localhost:8787") == ("localhost:8787", None)
    address, warning = dashboard_bind("0.0.0.0:8787")
    assert address == "0.0.0.0:8787" and "without authentication" in warning


def test_a_local_cluster_listens_on_loopback_only():
    import psutil

    from pipeline.config import LocalClusterConfig
    from workflows.cluster import open_client

    config = LocalClusterConfig(n_workers=1, threads_per_worker=1, pin_cores=False, dashboard_address=":0")
    with open_client(config) as (client, _):
        listening = [conn.laddr for process in [psutil.Process(), *psutil.Process().children(recursive=True)]
                     for conn in process.net_connections(kind="inet") if conn.status == psutil.CONN_LISTEN]
        assert client.dashboard_link.startswith("http://127.0.0.1:")
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening


def test_serve_warns_when_exposed_and_when_the_password_would_travel_in_clear():
    from viz.server import exposure_warnings

    assert exposure_warnings("127.0.0.1", auth=False, tls=False) == []
    assert "without --basic-auth" in exposure_warnings("0.0.0.0", auth=False, tls=False)[0]
    assert "travels in clear" in exposure_warnings("0.0.0.0", auth=True, tls=False)[0]
    assert exposure_warnings("0.0.0.0", auth=True, tls=True) == []


# --- auth ----------------------------------------------------------------------------------


def test_user_name_and_password_are_both_checked():
    from viz.server import credentials_match, load_credentials

    credentials = load_credentials("s3cret", user="alice")
    assert credentials_match(credentials, "alice", "s3cret")
    assert not credentials_match(credentials, "mallory", "s3cret")
    assert not credentials_match(credentials, "alice", "s3cret!")


def test_comparison_is_constant_time_over_every_entry(monkeypatch):
    import viz.server

    calls = []
    real = viz.server.hmac.compare_digest

    def counting(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(viz.server.hmac, "compare_digest", counting)
    credentials = {"alice": "one", "bob": "two", "carol": "three"}
    assert not viz.server.credentials_match(credentials, "nobody", "guess")
    assert len(calls) == 2 * len(credentials)  # no early exit on an unknown user or the first mismatch


def test_a_mistyped_credentials_file_is_an_error_not_a_password(tmp_path):
    from viz.server import ServeError, load_credentials

    with pytest.raises(ServeError, match="users.jsn looks like a file but there is none"):
        load_credentials(str(tmp_path / "users.jsn"))
    bad = tmp_path / "users.json"
    bad.write_text("{not json")
    with pytest.raises(ServeError, match="not valid JSON"):
        load_credentials(str(bad))
    bad.write_text(json.dumps(["alice"]))
    with pytest.raises(ServeError, match="non-empty JSON object"):
        load_credentials(str(bad))
    good = tmp_path / "ok.json"
    good.write_text(json.dumps({"alice": "a", "bob": "b"}))
    assert load_credentials(str(good)) == {"alice": "a", "bob": "b"}
    result = invoke(["serve", "no-such-run", "--basic-auth", "./users.jsn"])
    assert_one_line_error(result, "--basic-auth ./users.jsn looks like a file")


@pytest.fixture
def login_server():
    """A served synthetic run with a password for `alice`, on a thread; fast login delays."""
    from workflows.bench.serve import SyntheticRun
    from viz.server import LoginThrottle, make_server

    port = free_port()
    started, holder = threading.Event(), {}

    def serve():
        asyncio.set_event_loop(asyncio.new_event_loop())
        server = make_server(SyntheticRun(2_000), port=port, basic_auth="s3cret", auth_user="alice", warm=False,
                             throttle=LoginThrottle(base=0.2, cap=5.0))
        server.start()
        holder["server"] = server
        started.set()
        server.io_loop.start()

    threading.Thread(target=serve, daemon=True).start()
    assert started.wait(60)
    yield f"http://127.0.0.1:{port}"
    server = holder["server"]
    server.io_loop.add_callback(server.io_loop.stop)


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def login(base: str, user: str, password: str) -> tuple[bool, float]:
    """(accepted, seconds): a POST to the login page; accepted = a user cookie was set."""
    opener = urllib.request.build_opener(NoRedirect)
    body = urllib.parse.urlencode({"username": user, "password": password}).encode()
    began = time.perf_counter()
    try:
        response = opener.open(urllib.request.Request(f"{base}/login", data=body), timeout=30)
    except urllib.error.HTTPError as error:  # the redirect, not followed
        response = error
    seconds = time.perf_counter() - began
    cookies = response.headers.get_all("Set-Cookie") or []
    return any(cookie.startswith("user=") for cookie in cookies), seconds


def test_login_checks_the_user_and_slows_down_after_each_failure(login_server):
    assert login(login_server, "mallory", "s3cret")[0] is False  # the right password for a wrong user
    times = [login(login_server, "alice", "wrong")[1] for _ in range(3)]
    # failures so far 1, 2, 3: waits of 0.2, 0.4, 0.8 s before each attempt is checked
    assert times[0] >= 0.18 and times[1] >= 0.38 and times[2] >= 0.75, times
    accepted, seconds = login(login_server, "alice", "s3cret")
    assert accepted and seconds >= 1.5  # the right password waits its turn too
    assert login(login_server, "alice", "s3cret")[1] < 1.0  # a success clears the count


def test_a_page_needs_the_login(login_server):
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(login_server + "/", timeout=30)
        status, location = 200, ""
    except urllib.error.HTTPError as error:
        status, location = error.code, error.headers.get("Location", "")
    assert status in (302, 303) and "login" in location


# --- one line for every user error ---------------------------------------------------------------


@pytest.fixture(scope="module")
def t5_encoder(tmp_path_factory) -> str:
    from conftest import minilm_tokenizer
    from transformers import T5Config, T5EncoderModel

    path = tmp_path_factory.mktemp("t5enc") / "model"
    tokenizer = minilm_tokenizer()
    T5EncoderModel(T5Config(vocab_size=tokenizer.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                            num_heads=4)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_text_model_on_an_image_folder(tiny_models, image_folder, tmp_path):
    result = invoke(["extract", "--model", tiny_models["bert"], "--data", image_folder, "--out", str(tmp_path / "r")])
    assert_one_line_error(result, image_folder, "holds images", "reads text")


def test_image_model_on_a_text_file(tiny_models, text_file, tmp_path):
    result = invoke(["extract", "--model", tiny_models["vit"], "--data", text_file, "--out", str(tmp_path / "r")])
    assert_one_line_error(result, text_file, "holds text", "reads image")


def test_modality_check_names_both_and_what_to_give(image_folder, text_file):
    from pipeline.sources import SourceError, check_modality, source_modality

    assert source_modality(image_folder) == "image" and source_modality(text_file) == "text"
    assert source_modality("demo:digits") == "image" and source_modality("demo:wiki") == "text"
    check_modality(text_file, "text", "bert")
    with pytest.raises(SourceError, match="a folder of images"):
        check_modality(text_file, "image", "vit")


def test_config_that_is_not_utf8(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("# café\nextract:\n  model: demo:minilm\n  data: demo:wiki\n  out: x\n".encode("latin-1"))
    assert_one_line_error(invoke(["extract", "--config", str(config)]), "latin1.yaml is not UTF-8", "save it as UTF-8")
    assert_one_line_error(invoke(["run", str(config)]), "is not UTF-8")


def test_debug_shows_the_traceback(tmp_path):
    config = tmp_path / "latin1.yaml"
    config.write_bytes("extract: caf\xe9\n".encode("latin-1"))
    result = invoke(["--debug", "extract", "--config", str(config)])
    assert result.exit_code == 2 and "Traceback" in result.output and "ConfigError" in result.output
    assert result.output.rstrip().splitlines()[-1].startswith("error:")


def test_out_pointing_at_a_file(tiny_models, text_file, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("not a run")
    result = invoke(["extract", "--model", tiny_models["bert"], "--data", text_file, "--out", str(target)])
    assert_one_line_error(result, str(target))
    assert target.read_text() == "not a run"


def test_out_in_an_unwritable_place(tiny_models, text_file):
    result = invoke(["extract", "--model", tiny_models["bert"], "--data", text_file, "--out", "/proc/qkatlas-run"])
    assert_one_line_error(result, "/proc/")


def test_t5_encoder_is_refused_by_the_probe(t5_encoder, text_file, tmp_path):
    result = invoke(["extract", "--model", t5_encoder, "--data", text_file, "--out", str(tmp_path / "r")])
    assert_one_line_error(result, "T5EncoderModel", "relative position bias")


def test_serve_port_out_of_range():
    assert_one_line_error(invoke(["serve", "no-such-run", "--port", "70000"]), "--port 70000", "1 to 65535")


def test_serve_port_in_use(text_run):  # noqa: F811
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = invoke(["serve", text_run, "--port", str(port)])
    assert_one_line_error(result, f"port {port}", "already in use", "--port")


def test_serve_tls_files_that_do_not_load(text_run, tmp_path):  # noqa: F811
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate")
    result = invoke(["serve", text_run, "--tls-cert", str(cert), "--tls-key", str(tmp_path / "missing.key")])
    assert_one_line_error(result, "--tls-cert", "PEM")
    assert_one_line_error(invoke(["serve", text_run, "--tls-cert", str(cert)]), "--tls-key")


def test_every_user_error_class_shares_one_base():
    from pipeline.config import ConfigError
    from pipeline.errors import QkatlasError
    from pipeline.extract import ExtractError
    from pipeline.models import ModelError
    from pipeline.reduce import BackendError
    from pipeline.sources import SourceError
    from viz.data import SearchError
    from viz.server import ServeError
    from workflows.cluster import ClusterError

    for error in (ConfigError, SourceError, ModelError, ExtractError, BackendError, ServeError, ClusterError,
                  SearchError):
        assert issubclass(error, QkatlasError), error
