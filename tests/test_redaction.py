"""Credentials never reach the user's screen: a database or tracking URI's password, in any of the
forms drivers accept, is masked in URIs, in error messages that quote them (or quote the password
alone), in every line the CLI prints, and in what `llmops db` and `llmops ui` show."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

LLMOPS = str(Path(sys.executable).with_name("llmops"))

# (a URI of each form, the secrets it carries as written and as the driver receives them)
FORMS = [
    ("postgresql+psycopg://u:pa/ss@db.example:5432/x", ["pa/ss"]),
    ("postgresql+psycopg://u:pa%20ss@db.example:5432/x", ["pa%20ss", "pa ss"]),
    ("postgresql+psycopg://u:pa ss@db.example:5432/x", ["pa ss"]),
    ("postgresql+psycopg://u@db.example:5432/x?password=S3cret", ["S3cret"]),
    ("postgresql+psycopg://u@db.example/x?sslmode=require&PWD=S3cret&application_name=a", ["S3cret"]),
    ("http://alice:S3cret@db.example:5000", ["S3cret"]),
    ("postgresql+psycopg://u:p%40ss@db.example:5432/x", ["p%40ss", "p@ss"]),
    ("postgresql+psycopg://u:p@ss@db.example:5432/x", ["p@ss"]),
    ("https://db.example/api?api_key=K3y&x=1", ["K3y"]),
    ("https://db.example/api?access_token=T0k&x=1", ["T0k"]),
]


def _assert_hidden(text: str, secrets: list[str]) -> None:
    for secret in secrets:
        assert secret not in text, f"{secret!r} shown in {text!r}"


# -- the functions ------------------------------------------------------------------------------
def test_redact_hides_every_form_of_password() -> None:
    from llmops.core.settings import redact

    for uri, secrets in FORMS:
        shown = redact(uri)
        _assert_hidden(shown, secrets)
        assert "db.example" in shown  # where it points stays readable
        assert shown.startswith(uri.split("://")[0] + "://")


def test_redact_keeps_what_is_not_a_credential() -> None:
    from llmops.core.settings import redact

    for uri in ("sqlite:////tmp/x.db", "sqlite:////tmp/a@b/x.db", "file:///srv/mlruns", "http://127.0.0.1:5000",
                "postgresql+psycopg://db.example:5432/x?sslmode=require", "http://host/path/a@b"):
        assert redact(uri) == uri
    assert redact("postgresql+psycopg://u:pa/ss@h:5432/x?sslmode=require&password=p") == \
        "postgresql+psycopg://***@h:5432/x?sslmode=require&password=***"


@pytest.mark.parametrize(("uri", "secrets"), FORMS)
def test_redact_text_hides_uris_inside_messages(uri: str, secrets: list[str]) -> None:
    from llmops.core.settings import redact_text

    message = f"OperationalError: (psycopg) could not connect to '{uri}' (see {uri}), retrying"
    shown = redact_text(message)
    if " " not in uri:  # a raw space ends a URI in free text: only the configured secrets catch it
        _assert_hidden(shown, secrets)
    assert shown.startswith("OperationalError: (psycopg) could not connect to '") and shown.endswith(", retrying")


@pytest.mark.parametrize(("uri", "secrets"), FORMS)
def test_redact_text_hides_the_configured_secrets_without_their_uri(uri: str, secrets: list[str]) -> None:
    """A driver may quote the password alone, decoded or as written."""
    from llmops.core.settings import redact_text, uri_secrets

    known = uri_secrets(uri)
    assert known, uri
    for secret in secrets:
        shown = redact_text(f"could not connect to '{uri}': password \"{secret}\" was refused", *known)
        _assert_hidden(shown, secrets)


def test_redact_text_masks_password_pairs_but_not_counts() -> None:
    from llmops.core.settings import redact_text

    shown = redact_text("invalid dsn: host=db port=5432 password=S3cret sslpassword='x y' tokens=512 max_tokens=9")
    assert "S3cret" not in shown and "x y" not in shown
    assert "host=db port=5432" in shown and "tokens=512 max_tokens=9" in shown


def test_configured_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmops.core.settings import configured_secrets, redact_text, resolve

    monkeypatch.setenv("LLMOPS_DATABASE_URL", "postgresql+psycopg://u:pa/ss@h/x?password=S3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:Tr4ck@h:5000")
    assert set(configured_secrets()) >= {"pa/ss", "S3cret", "Tr4ck"}
    assert set(resolve().secrets()) == {"pa/ss", "S3cret", "Tr4ck"}
    assert redact_text("password pa/ss, then Tr4ck", *configured_secrets()) == "password ***, then ***"


def test_every_log_line_passes_through_redaction(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from llmops.app.output import log

    monkeypatch.setenv("LLMOPS_DATABASE_URL", "postgresql+psycopg://u:pa ss@h/x")
    log("connecting with 'pa ss' to postgresql+psycopg://u:pa%2Fss@h/x?token=T0k")
    err = capsys.readouterr().err
    _assert_hidden(err, ["pa ss", "pa%2Fss", "T0k"])
    assert err.startswith("connecting with '***' to postgresql+psycopg://***@h/x?token=***")


def test_progress_lines_pass_through_redaction(monkeypatch: pytest.MonkeyPatch) -> None:
    """A phase label or warning that quotes a URI is redacted like every other line, on a
    terminal's bar and in the summary lines alike."""
    import io

    from llmops.core.progress import StreamReporter

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:Tr4ck@tracking:5000")
    for tty in (True, False):
        stream = io.StringIO()
        rep = StreamReporter(stream, tty=tty, milestone_after=0.0)
        with rep.phase("uploading to http://alice:Tr4ck@tracking:5000/artifacts", total=2) as ph:
            ph.advance(2)
        rep.warn("retrying http://bob:S3cret@other:5000 (token Tr4ck)")
        out = stream.getvalue()
        _assert_hidden(out, ["Tr4ck", "S3cret"])
        assert "uploading to http://***@tracking:5000/artifacts" in out and "warning: retrying http://***@other" in out


def test_a_debug_traceback_is_redacted(tmp_path: Path) -> None:
    """LLMOPS_DEBUG=1 shows the traceback of an unexpected error, its frames' messages redacted."""
    env = {**os.environ, "LLMOPS_DEBUG": "1", "LLMOPS_STORE": str(tmp_path / "s"),
           "MLFLOW_TRACKING_URI": "http://alice:Tr4ck@127.0.0.1:9/"}
    env.pop("LLMOPS_DATABASE_URL", None)
    r = subprocess.run([sys.executable, "-c", "import sys; from llmops.app.cli import main; "
                        "from llmops.app.cli.base import cli\n"
                        "@cli.command('boom')\n"
                        "def boom():\n    raise RuntimeError('cannot reach http://alice:Tr4ck@127.0.0.1:9/ (Tr4ck)')\n"
                        "sys.exit(main(['boom']))"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "Traceback (most recent call last)" in r.stderr and "RuntimeError" in r.stderr
    _assert_hidden(r.stderr, ["Tr4ck"])


def test_a_store_that_cannot_open_never_quotes_its_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver's message is redacted, and the original exception is not chained to the error."""
    from llmops.core.errors import LLMOpsError
    from llmops.core.settings import resolve
    from llmops.registry.store import Store

    # SQLAlchemy's own message quotes the URI it cannot read (the port is not a number)
    monkeypatch.setenv("LLMOPS_DATABASE_URL", "postgresql+psycopg://u:pa/ss@h:5o/x?password=S3cret")
    with pytest.raises(LLMOpsError) as info:
        Store(resolve(tmp_path / "store")).open()
    _assert_hidden(str(info.value), ["pa/ss", "S3cret"])
    assert "cannot open store postgresql+psycopg://***@h:5o/x" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# -- through the real command line ---------------------------------------------------------------
def _with_password(url: str, form: str) -> tuple[str, list[str]]:
    """``url`` (postgresql+psycopg://user@host:port/db) carrying a password in ``form``."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1) if "@" in rest else ("postgres", rest)
    user = user.split(":", 1)[0]
    forms = {
        "slash": (f"{scheme}://{user}:pa/ss@{host}", ["pa/ss"]),
        "space-encoded": (f"{scheme}://{user}:pa%20ss@{host}", ["pa%20ss", "pa ss"]),
        "space-raw": (f"{scheme}://{user}:pa ss@{host}", ["pa ss"]),
        "query": (f"{scheme}://{user}@{host}?password=S3cret", ["S3cret"]),
        "at-encoded": (f"{scheme}://{user}:p%40ss@{host}", ["p%40ss", "p@ss"]),
        "at-raw": (f"{scheme}://{user}:p@ss@{host}", ["p@ss"]),
    }
    return forms[form]


PG_FORMS = ["slash", "space-encoded", "space-raw", "query", "at-encoded", "at-raw"]


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMOPS_DATABASE_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(LLMOPS_STORE=str(tmp_path / f"store-{uuid.uuid4().hex[:8]}"), **extra)
    return env


@pytest.mark.postgres
def test_db_commands_never_show_the_password(pg_url: str, tmp_path: Path) -> None:
    """`llmops db upgrade` and `db current` (--json prints the database URI) on a real PostgreSQL
    server, whose trust authentication takes any password: every form of it stays hidden."""
    for form in PG_FORMS:
        url, secrets = _with_password(pg_url, form)
        env = _env(tmp_path, LLMOPS_DATABASE_URL=url)
        for args in (["db", "upgrade", "--json"], ["db", "current", "--json"]):
            r = subprocess.run([LLMOPS, *args], capture_output=True, text=True, env=env, timeout=300)
            _assert_hidden(r.stdout + r.stderr, secrets)
            if form == "at-raw":  # SQLAlchemy cannot read it: refused, with a hint
                assert r.returncode == 1 and "%40" in r.stderr, r.stderr
                continue
            assert r.returncode == 0, (form, r.stderr)
            doc = json.loads(r.stdout)
            assert doc["database"].startswith("postgresql+psycopg://***@127.0.0.1:"), doc


@pytest.mark.postgres
def test_db_current_that_fails_never_shows_the_password(pg_url: str, tmp_path: Path) -> None:
    """The same forms against a database that does not exist (MLflow retries, then the error), and
    a tracking server's basic-auth URI that does not answer: stdout and stderr never show them."""
    missing = pg_url.rsplit("/", 1)[0] + f"/llmops_missing_{uuid.uuid4().hex[:8]}"
    runs = []
    for form in PG_FORMS:
        url, secrets = _with_password(missing, form)
        env = _env(tmp_path, LLMOPS_DATABASE_URL=url)
        runs.append((form, secrets, subprocess.Popen([LLMOPS, "db", "current", "--json"], env=env, text=True,
                                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(tmp_path, MLFLOW_TRACKING_URI=f"http://alice:S3cret@127.0.0.1:{port}/?token=T0k",
               MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5")
    runs.append(("basic-auth", ["S3cret", "T0k"], subprocess.Popen(
        [LLMOPS, "db", "current", "--json"], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for form, secrets, proc in runs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, (form, err)
        _assert_hidden(out + err, secrets)
        errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert len(errors) == 1 and "cannot open store" in errors[0], (form, err)
        assert json.loads(out)["error"] == errors[0][len("error: "):]


@pytest.mark.postgres
@pytest.mark.timeout(400)
def test_ui_never_shows_the_password(pg_url: str, tmp_path: Path) -> None:
    """`llmops ui --serve-artifacts` tells clients where the database is (redacted), prints the
    server's own output through the same redaction, and stops on SIGTERM with status 0."""
    from llmops.app.server import port_free, wait_until_up

    url, secrets = _with_password(pg_url, "slash")
    env = _env(tmp_path, LLMOPS_DATABASE_URL=url)
    port = next(p for p in range(5800, 5900) if port_free("127.0.0.1", p))
    proc = subprocess.Popen([LLMOPS, "ui", "--serve-artifacts", "--port", str(port), "--json"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_up(f"http://127.0.0.1:{port}", proc, timeout=180)
        lines = []
        assert proc.stderr is not None
        for line in proc.stderr:  # the clients' line comes once the server answers
            lines.append(line)
            if line.startswith("clients:"):
                break
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=120)
        err = "".join(lines) + rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    _assert_hidden(out + err, secrets)
    assert "LLMOPS_DATABASE_URL=postgresql+psycopg://***@127.0.0.1:" in err
    assert json.loads(out)["database"].startswith("postgresql+psycopg://***@")
