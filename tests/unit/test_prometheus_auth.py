"""Credentials and TLS for Prometheus (issue 15): where `gpuwatch` takes them from (the URL,
GPUWATCH_PROMETHEUS_USER/_PASSWORD or _TOKEN, netrc) and in which order, that no secret is
ever shown, that a redirect elsewhere gets none, --prometheus.ca-file, and `gpuwatch serve`'s
share of it. Against a small Prometheus API on 127.0.0.1 that wants one Authorization and
answers an empty fleet (so a command that got through says "knows no GPUs"); the real
Prometheus with basic auth and TLS is in tests/e2e/test_prometheus_protected.py."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpfake
import pytest
from certs import self_signed
from cli_run import one_error, run

from gpuwatch import cli, credentials
from gpuwatch.cli import client
from gpuwatch.cli.common import ENV_PROMETHEUS, ENV_PROMETHEUS_CA_FILE
from gpuwatch.cli.serve import options_from_args
from gpuwatch.fleet.prometheus import (
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_USER,
    VARIABLES,
    Prometheus,
    PrometheusError,
)
from gpuwatch.serve.app import prometheus_fleet

PASSWORD = "pr0m-s3cret"
TOKEN = "t0ken-s3cret"
WRONG = "wr0ng-s3cret"
SECRETS = (PASSWORD, TOKEN, WRONG)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Api:
    """An empty fleet behind one accepted Authorization (None: open); `redirect` answers a
    request with a 307 to that URL + /moved + its path (the /moved ones are answered);
    `seen` is each request's Authorization."""

    accept: str | None = basic("grafana", PASSWORD)
    redirect: str | None = None
    seen: list[str | None] = field(default_factory=list)
    url: str = ""

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def serve_api(api: Api, tls: ssl.SSLContext | None = None) -> Callable[[], None]:
    class Handler(httpfake.QuietHandler):
        def do_GET(self) -> None:
            given = self.headers.get("Authorization")
            api.seen.append(given)
            if api.redirect is not None and not self.path.startswith("/moved/"):
                self.reply(307, b"", [("Location", f"{api.redirect}/moved{self.path}")])
            elif api.accept is not None and given != api.accept:
                self.reply(401, b"Unauthorized\n",
                           [("WWW-Authenticate", 'Basic realm="prometheus"')])
            else:
                self.reply(200, json.dumps({"status": "success", "data": {
                    "resultType": "vector", "result": []}}).encode())

    api.url, stop = httpfake.start(Handler, tls)
    return stop


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No credentials in the environment; $NETRC names a file that does not exist yet (the
    test's to write); returns that path."""
    for name in (ENV_USER, ENV_PASSWORD, ENV_TOKEN, ENV_PROMETHEUS, ENV_PROMETHEUS_CA_FILE,
                 client.ENV_USER, client.ENV_PASSWORD):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    monkeypatch.setenv(credentials.ENV_NETRC, str(netrc))
    return netrc


@pytest.fixture
def api(clean: Path) -> Iterator[Api]:
    found = Api()
    stop = serve_api(found)
    try:
        yield found
    finally:
        stop()


def no_secret_in(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in text, text


def got_through(capsys: pytest.CaptureFixture[str], api: Api, *argv: str) -> str:
    """The command reached the fleet (the API's empty one): one line saying it knows no
    GPUs, naming the URL as shown."""
    err = one_error(capsys, *argv, "status")
    assert "knows no GPUs" in err, err
    no_secret_in(err)
    return err


# -- where the credentials come from, and in which order -----------------------------------------

def test_the_user_and_password_of_the_environment(
        api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV_USER, "grafana")
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    err = got_through(capsys, api, "--prometheus", api.url)
    assert f"Prometheus at {api.url} knows no GPUs" in err
    assert api.seen[-1] == basic("grafana", PASSWORD)


def test_the_netrc_entry_of_the_host_or_its_default(
        api: Api, clean: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    clean.write_text(f"machine elsewhere login other password {WRONG}\n"
                     f"machine 127.0.0.1 login grafana password {PASSWORD}\n")
    got_through(capsys, api, "--prometheus", api.url)
    assert api.seen[-1] == basic("grafana", PASSWORD)
    # without $NETRC: ~/.netrc, and its default entry
    monkeypatch.delenv(credentials.ENV_NETRC)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".netrc").write_text(f"default login grafana password {PASSWORD}\n")
    got_through(capsys, api, "--prometheus", api.url)
    assert api.seen[-1] == basic("grafana", PASSWORD)


def test_the_url_wins_over_the_environment_which_wins_over_netrc(
        api: Api, clean: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    clean.write_text(f"machine 127.0.0.1 login netrc-user password {WRONG}\n")
    monkeypatch.setenv(ENV_USER, "env-user")
    monkeypatch.setenv(ENV_PASSWORD, WRONG)
    url = api.url.replace("//", f"//grafana:{PASSWORD}@")
    err = got_through(capsys, api, "--prometheus", url)
    assert api.seen[-1] == basic("grafana", PASSWORD)
    assert f"Prometheus at {api.url.replace('//', '//grafana@')} knows no GPUs" in err
    one_error(capsys, "--prometheus", api.url, "status")
    assert api.seen[-1] == basic("env-user", WRONG)
    monkeypatch.delenv(ENV_USER)
    monkeypatch.delenv(ENV_PASSWORD)
    one_error(capsys, "--prometheus", api.url, "status")
    assert api.seen[-1] == basic("netrc-user", WRONG)


def test_a_user_without_a_password_takes_the_password_of_their_netrc_entry(
        api: Api, clean: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    clean.write_text(f"machine 127.0.0.1 login grafana password {PASSWORD}\n")
    got_through(capsys, api, "--prometheus", api.url.replace("//", "//grafana@"))
    assert api.seen[-1] == basic("grafana", PASSWORD)
    monkeypatch.setenv(ENV_USER, "grafana")
    got_through(capsys, api, "--prometheus", api.url)
    assert api.seen[-1] == basic("grafana", PASSWORD)
    # another user: no entry of theirs, and no password to send
    monkeypatch.setenv(ENV_USER, "nobody")
    seen = len(api.seen)
    err = one_error(capsys, "--prometheus", api.url, "status")
    assert f"{ENV_USER} is set but no password: set {ENV_PASSWORD}, or a netrc entry " \
        f"(machine 127.0.0.1 login nobody password ...) in {clean}" in err
    err = one_error(capsys, "--prometheus", api.url.replace("//", "//nobody@"), "status")
    assert "names the user nobody but no password" in err and str(clean) in err
    assert len(api.seen) == seen  # nothing was sent
    no_secret_in(err)


def test_a_bearer_token_from_the_environment(
        api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    api.accept = f"Bearer {TOKEN}"
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    got_through(capsys, api, "--prometheus", api.url)
    assert api.seen[-1] == f"Bearer {TOKEN}"
    monkeypatch.setenv(ENV_TOKEN, WRONG)
    err = one_error(capsys, "--prometheus", api.url, "status")
    assert f"refused the credentials of the bearer token (from {ENV_TOKEN}) (HTTP 401)" in err
    no_secret_in(err)


@pytest.mark.parametrize("other", [ENV_USER, ENV_PASSWORD])
def test_a_token_and_a_user_or_password_are_refused_before_asking(
        api: Api, other: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    monkeypatch.setenv(other, PASSWORD)
    err = one_error(capsys, "--prometheus", api.url, "status")
    assert f"{ENV_TOKEN} and {ENV_USER}/{ENV_PASSWORD} are both set" in err
    assert api.seen == []
    no_secret_in(err)


def test_a_password_without_a_user_is_refused(
        api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(ENV_PASSWORD, PASSWORD)
    err = one_error(capsys, "--prometheus", api.url, "status")
    assert f"{ENV_PASSWORD} is set but no user: set {ENV_USER} too" in err
    no_secret_in(err)


@pytest.mark.parametrize("text", [f"machine 127.0.0.1 login grafana {PASSWORD}\n",
                                  f"machine 127.0.0.1 login grafana password {PASSWORD} x\n"])
def test_a_netrc_that_cannot_be_parsed_is_one_line_naming_it_not_its_secret(
        api: Api, clean: Path, text: str, capsys: pytest.CaptureFixture[str]) -> None:
    clean.write_text(text)
    err = one_error(capsys, "--prometheus", api.url, "status")
    assert f"{clean}: line " in err and ": not a netrc file curl can read" in err
    assert f"set {ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN})" in err
    no_secret_in(err)


def test_a_netrc_that_is_not_text_is_one_line(api: Api, clean: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    clean.write_bytes(b"machine 127.0.0.1 login grafana password \xff\xfe\n")
    assert f"{clean}: cannot read: not text" in one_error(capsys, "--prometheus", api.url,
                                                           "status")


def test_the_serve_client_shares_the_lookup(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpuwatch serve's client: the same order, its own variables, no token."""
    clean.write_text(f"machine monitor login bob password {WRONG}\n")
    assert client.credentials("http://monitor:9840", {credentials.ENV_NETRC: str(clean)}) == \
        ("bob", WRONG)
    environ = {credentials.ENV_NETRC: str(clean), client.ENV_USER: "alice",
               client.ENV_PASSWORD: PASSWORD, ENV_TOKEN: TOKEN}
    assert client.credentials("http://monitor:9840", environ) == ("alice", PASSWORD)
    assert client.credentials(f"http://carol:{PASSWORD}@monitor:9840", environ) == \
        ("carol", PASSWORD)
    clean.write_text(f"machine monitor login bob {WRONG}\n")
    with pytest.raises(client.ServiceError, match=f"set {client.ENV_USER} and "
                       f"{client.ENV_PASSWORD}$"):
        client.credentials("http://monitor:9840", {credentials.ENV_NETRC: str(clean)})


# -- never shown -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "expected"), [
    ("http://alice:s3cret@host:9090", "http://alice@host:9090"),
    ("https://alice:s%3Acr%40t@host:9090/prom/", "https://alice@host:9090/prom/"),
    ("http://alice:p@ss@host:9090", "http://alice@host:9090"),
    ("http://alice@host:9090", "http://alice@host:9090"),
    ("http://host:9090", "http://host:9090"),
    ("http://alice:s3cret@[::1", "http://alice@[::1"),
])
def test_a_url_is_shown_without_its_password(url: str, expected: str) -> None:
    assert credentials.shown(url) == expected


def test_no_failing_command_shows_a_secret(
        api: Api, clean: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Every way to fail with a secret around: wrong password in the URL, the environment
    and netrc, a token, no Prometheus, a URL that is none, a CA file that is none."""
    unreachable = "http://127.0.0.1:1"
    clean.write_text(f"machine 127.0.0.1 login grafana password {WRONG}\n")
    texts: list[str] = []
    for argv in (["--prometheus", api.url.replace("//", f"//grafana:{WRONG}@")],
                 ["--prometheus", api.url],
                 ["--prometheus", unreachable.replace("//", f"//grafana:{PASSWORD}@")],
                 ["--prometheus", f"ftp://grafana:{PASSWORD}@host"],
                 ["--prometheus", f"http://grafana:{PASSWORD}@[::1"],
                 ["--prometheus", api.url.replace("//", f"//grafana:{PASSWORD}@"),
                  "--prometheus.ca-file", str(clean.parent / "none.pem")]):
        for command in (["status"], ["status", "--json"], ["pick", "1", "--host", "x"]):
            texts.append(one_error(capsys, *argv, *command))
    monkeypatch.setenv(ENV_PROMETHEUS, api.url.replace("//", f"//grafana:{WRONG}@"))
    texts.append(one_error(capsys, "status"))
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    texts.append(one_error(capsys, "--prometheus", api.url, "status"))
    monkeypatch.setenv(ENV_USER, "grafana")
    texts.append(one_error(capsys, "--prometheus", api.url, "status"))
    with pytest.raises(SystemExit):
        cli.main(["status", "--help"])
    texts += capsys.readouterr()
    no_secret_in(*texts)
    assert f"Prometheus at {api.url.replace('//', '//grafana@')} refused the credentials " \
        "of grafana (from the URL) (HTTP 401)" in texts[0]
    assert f"refused the credentials of grafana (from {clean}) (HTTP 401)" in texts[3]
    assert f"cannot reach Prometheus at {unreachable.replace('//', '//grafana@')}: " in texts[6]
    assert "'ftp://grafana@host' is not a Prometheus URL" in texts[9]


def test_without_credentials_a_401_says_how_to_give_them(
        api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    err = one_error(capsys, "--prometheus", api.url, "status")
    assert err == f"gpuwatch: error: Prometheus at {api.url} asks for credentials (HTTP 401): " \
        f"set {ENV_USER} and {ENV_PASSWORD} (or {ENV_TOKEN}), or a netrc entry for machine " \
        "127.0.0.1 ($NETRC, else ~/.netrc)\n"
    assert api.seen == [None]


# -- redirects ---------------------------------------------------------------------------------

def test_credentials_follow_a_redirect_to_the_same_host_only(api: Api) -> None:
    """The same scheme, host and port: they go on; another port, or localhost for
    127.0.0.1, is another host (curl's rule): none."""
    auth = basic("grafana", PASSWORD)
    api.redirect = api.url
    assert Prometheus(api.url, basic_auth=("grafana", PASSWORD)).query("up") == []
    assert api.seen == [auth, auth]
    moved = Api(redirect=api.url)
    stop = serve_api(moved)
    try:
        api.seen.clear()
        api.redirect = None
        with pytest.raises(PrometheusError, match="HTTP 401"):
            Prometheus(moved.url.replace("//", f"//grafana:{PASSWORD}@")).query("up")
        assert (moved.seen, api.seen) == ([auth], [None])
    finally:
        stop()
    api.seen.clear()
    api.redirect = api.url.replace("127.0.0.1", "localhost")
    with pytest.raises(PrometheusError, match="HTTP 401"):
        Prometheus(api.url, basic_auth=("grafana", PASSWORD)).query("up")
    assert api.seen == [auth, None]


# -- TLS -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


def test_an_https_prometheus_is_checked_against_the_ca_file(
        clean: Path, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    api = Api()
    stop = serve_api(api, context)
    try:
        url = api.url.replace("//", f"//grafana:{PASSWORD}@")
        err = one_error(capsys, "--prometheus", url, "status")
        assert "certificate verify failed" in err and "--prometheus.ca-file PATH" in err
        assert api.seen == []  # the password never left over an unchecked connection
        got_through(capsys, api, "--prometheus", url, "--prometheus.ca-file", str(cert))
        monkeypatch.setenv(ENV_PROMETHEUS_CA_FILE, str(cert))
        got_through(capsys, api, "--prometheus", url)
        assert set(api.seen) == {basic("grafana", PASSWORD)}
        # a CA that did not sign it
        other, _ = self_signed(clean.parent, "other")
        err = one_error(capsys, "--prometheus", url, "--prometheus.ca-file", str(other),
                        "status")
        assert "certificate verify failed" in err
    finally:
        stop()


@pytest.mark.parametrize(("make", "says"), [
    (lambda p: None, "no such file"),
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: p.write_text("not a certificate\n"), "not a PEM CA certificate"),
])
def test_a_ca_file_that_is_none_is_one_line_naming_it(
        api: Api, tmp_path: Path, make: Callable[[Path], object], says: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ca.pem"
    make(path)
    err = one_error(capsys, "--prometheus", api.url, "--prometheus.ca-file", str(path),
                    "status")
    assert err.startswith(f"gpuwatch: error: {path} (--prometheus.ca-file): {says}"), err
    assert api.seen == []


# -- gpuwatch serve ----------------------------------------------------------------------------

def serve_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> str:
    """`gpuwatch serve` that stops before listening: exit 2 and one line."""
    code, out = run("serve", "--reservations.file", str(tmp_path / "r.yml"),
                    "--web.listen-address", "127.0.0.1:0", *argv)
    err = capsys.readouterr().err
    assert (code, out) == (2, ""), (code, out, err)
    assert err.count("\n") == 1 and err.startswith("gpuwatch serve: error: "), err
    no_secret_in(err)
    return err


def test_serve_refuses_to_start_with_credentials_or_a_ca_file_it_cannot_use(
        clean: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.pem"
    assert f"{missing} (--prometheus.ca-file): no such file" in serve_fails(
        capsys, tmp_path, "--prometheus.ca-file", str(missing))
    monkeypatch.setenv(ENV_TOKEN, TOKEN)
    monkeypatch.setenv(ENV_USER, "grafana")
    assert "are both set" in serve_fails(capsys, tmp_path)
    monkeypatch.delenv(ENV_TOKEN)
    monkeypatch.delenv(ENV_USER)
    clean.write_text(f"machine 127.0.0.1 login grafana {PASSWORD}\n")
    assert f"{clean}: line " in serve_fails(capsys, tmp_path)


def test_serve_asks_prometheus_with_the_credentials(
        api: Api, clean: Path, tmp_path: Path, tls_files: tuple[Path, Path]) -> None:
    clean.write_text(f"machine 127.0.0.1 login grafana password {PASSWORD}\n")
    assert prometheus_fleet(api.url, 5)() == []
    assert api.seen and set(api.seen) == {basic("grafana", PASSWORD)}
    args = cli.build_parser().parse_args([
        "serve", "--reservations.file", str(tmp_path / "r.yml"),
        "--prometheus", api.url, "--prometheus.ca-file", str(tls_files[0])])
    options = options_from_args(args)
    assert options.prometheus_ca_file == tls_files[0]
    assert PASSWORD not in repr(options)


def test_the_variables_are_the_documented_ones() -> None:
    assert (VARIABLES.user, VARIABLES.password, VARIABLES.token) == (
        "GPUWATCH_PROMETHEUS_USER", "GPUWATCH_PROMETHEUS_PASSWORD", "GPUWATCH_PROMETHEUS_TOKEN")
    assert urllib.parse.urlsplit(credentials.without_userinfo(
        f"http://a:{PASSWORD}@h:1/x")).geturl() == "http://h:1/x"
