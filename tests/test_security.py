"""Security against a real mosquitto: TLS with a test CA, passwords, ACL denials, no leaked secrets.

The test makes its own CA, server and client certificates (openssl, EC P-256), a
password file (mosquitto_passwd) and an ACL file; the broker has a TLS listener that
requires a client certificate and a plain loopback listener, both with passwords.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from stream_ser.errors import ConfigError
from stream_ser.mqtt import PASSWORD_ENV, parse_broker_url
from stream_ser.settings import MqttSettings
from tests.conftest import LABELS, REPO, Broker
from tests.schema import check_result
from tools.net import free_port, wait_for_port

PREFIX = "stream-ser"
PUBLISHER_PASSWORD = "pub-Secret-4711"
READER_PASSWORD = "reader-Secret-0815"
LIMITED_PASSWORD = "limited-Secret-1234"

ACL = f"""\
# the publisher: its result topics and its status, nothing else
user publisher
topic write {PREFIX}/+/utterance
topic write {PREFIX}/+/window
topic write {PREFIX}/+/speaking
topic write {PREFIX}/status/#

# a subscriber: read-only
user reader
topic read {PREFIX}/#

# a publisher whose utterance topic is not granted
user limited
topic write {PREFIX}/+/speaking
topic write {PREFIX}/status/#
"""


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1, a client certificate, a foreign CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _self_signed_ca(name: str, stem: str, folder: Path) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{stem}.key", "-out", f"{stem}.pem", "-subj", f"/CN={name}",
             "-days", "1", "-addext", "basicConstraints=critical,CA:TRUE", cwd=folder)  # fmt: skip


def _signed(name: str, stem: str, folder: Path, extensions: str) -> None:
    """A P-256 key and a certificate for it signed by ca.pem/ca.key."""
    (folder / f"{stem}.ext").write_text(extensions + "\n")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", f"{stem}.key", "-out", f"{stem}.csr", "-subj", f"/CN={name}",
             cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", f"{stem}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-days", "1", "-sha256", "-extfile", f"{stem}.ext",
             "-out", f"{stem}.pem", cwd=folder)  # fmt: skip


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A test CA with a server certificate (for 127.0.0.1) and a client certificate, made with
    the openssl command; and an unrelated CA."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is not installed (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("pki")
    _self_signed_ca("stream-ser test CA", "ca", folder)
    _signed("127.0.0.1", "server", folder, "subjectAltName=IP:127.0.0.1,DNS:localhost")
    _signed("publisher", "client", folder, "extendedKeyUsage=clientAuth")
    _self_signed_ca("unrelated CA", "other", folder)
    return Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
        other_ca=folder / "other.pem",
    )


class SecureBroker(Broker):
    """mosquitto with passwords, an ACL file, a TLS listener (client certificate required)
    and a plain loopback listener."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        super().__init__(directory)
        self.tls_port = free_port()
        passwords = directory / "passwords"
        users = (
            ("publisher", PUBLISHER_PASSWORD),
            ("reader", READER_PASSWORD),
            ("limited", LIMITED_PASSWORD),
        )
        for index, (user, password) in enumerate(users):
            create = ["-c"] if index == 0 else []
            subprocess.run(
                ["mosquitto_passwd", *create, "-b", str(passwords), user, password],
                check=True,
                capture_output=True,
                timeout=30,
            )
        (directory / "acl").write_text(ACL)
        self.config.write_text(
            f"user {getpass.getuser()}\n"  # as root, mosquitto would switch to a user who
            # cannot read the test's private temporary folder
            "per_listener_settings false\n"
            "allow_anonymous false\n"
            f"password_file {passwords}\n"
            f"acl_file {directory / 'acl'}\n"
            "persistence false\n"
            f"listener {self.port} 127.0.0.1\n"
            f"listener {self.tls_port} 127.0.0.1\n"
            f"cafile {pki.ca}\n"
            f"certfile {pki.server_cert}\n"
            f"keyfile {pki.server_key}\n"
            "require_certificate true\n"
        )

    def start(self) -> None:
        super().start()
        wait_for_port(self.tls_port)

    @property
    def tls_url(self) -> str:
        return f"mqtts://publisher@127.0.0.1:{self.tls_port}"

    def plain_url(self, user: str) -> str:
        return f"mqtt://{user}@127.0.0.1:{self.port}"


@pytest.fixture
def secure_broker(tmp_path: Path, pki: Pki) -> Any:
    """A running SecureBroker, stopped after the test."""
    for tool in ("mosquitto", "mosquitto_passwd"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (apt-get install mosquitto)")
    (tmp_path / "broker").mkdir()
    server = SecureBroker(tmp_path / "broker", pki)
    server.start()
    yield server
    server.stop()


def run_ser(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python -m stream_ser ARGS` with extra environment variables; output as text."""
    clean = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    return subprocess.run(
        [sys.executable, "-m", "stream_ser", *args],
        env=clean | (env or {}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO, check=False,
    )


def password_file(tmp_path: Path, password: str) -> Path:
    path = tmp_path / "mqtt-password"
    path.write_text(password + "\n")
    path.chmod(0o600)
    return path


class Reader:
    """The read-only subscriber: collects every message under the prefix until offline status."""

    def __init__(self, broker: SecureBroker) -> None:
        self.broker = broker
        self.raw: list[tuple[str, bytes]] = []
        self.subscribed = asyncio.Event()
        self.offline = asyncio.Event()

    async def run(self) -> None:
        async with aiomqtt.Client(
            "127.0.0.1", self.broker.port, username="reader", password=READER_PASSWORD
        ) as client:
            await client.subscribe(f"{PREFIX}/#", qos=1)
            self.subscribed.set()
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                self.raw.append((str(message.topic), message.payload))
                if json.loads(message.payload).get("state") == "offline":
                    self.offline.set()

    def on(self, suffix: str) -> list[dict[str, Any]]:
        """Payloads of topics ending in `suffix`, in arrival order."""
        return [json.loads(payload) for topic, payload in self.raw if topic.endswith(suffix)]


async def run_with_reader(broker: SecureBroker, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    """Run the CLI while the reader listens; (completed process, reader)."""
    reader = Reader(broker)
    listening = asyncio.create_task(reader.run())
    try:
        async with asyncio.timeout(10):
            await reader.subscribed.wait()
        done = await asyncio.to_thread(run_ser, *args, env=env)
        if done.returncode == 0:
            async with asyncio.timeout(15):
                await reader.offline.wait()
    finally:
        listening.cancel()
    return done, reader


def assert_no_secret(done: subprocess.CompletedProcess[str], reader: Reader, secret: str) -> None:
    assert secret not in done.stdout
    assert secret not in done.stderr
    for _, payload in reader.raw:
        assert secret.encode() not in payload


def cli_args(path: Path, model: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(path), "--model", str(model), "--stream-id", "room1",
            "--mqtt-client-id", "secure-ser", "--mqtt-connect-timeout-s", "5", *extra]  # fmt: skip


@pytest.mark.slow
async def test_tls_with_client_certificate_delivers_and_leaks_no_password(
    secure_broker: SecureBroker,
    pki: Pki,
    tmp_path: Path,
    tiny_model: Path,
    speech_with_pauses: tuple[Path, int],
) -> None:
    path, clip_count = speech_with_pauses
    done, reader = await run_with_reader(
        secure_broker,
        *cli_args(path, tiny_model, "--mqtt", secure_broker.tls_url,
                  "--mqtt-password-file", str(password_file(tmp_path, PUBLISHER_PASSWORD)),
                  "--mqtt-ca-file", str(pki.ca), "--mqtt-cert-file", str(pki.client_cert),
                  "--mqtt-key-file", str(pki.client_key), "--log-level", "debug"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"connected to mqtts://publisher@127.0.0.1:{secure_broker.tls_port}" in done.stderr
    finals = [m for m in reader.on("/room1/utterance") if m["final"]]
    assert [m["utterance_id"] for m in finals] == list(range(1, clip_count + 1))
    for message in finals:
        check_result(message, LABELS)
    offline = reader.on("/status/secure-ser")[-1]
    assert offline["state"] == "offline"
    assert offline["counters"]["publish_denied"] == 0
    assert_no_secret(done, reader, PUBLISHER_PASSWORD)


@pytest.mark.slow
async def test_tls_with_a_foreign_ca_is_refused(
    secure_broker: SecureBroker, pki: Pki, tmp_path: Path, tiny_model: Path,
    speech_with_pauses: tuple[Path, int],
) -> None:  # fmt: skip
    path, _ = speech_with_pauses
    done = await asyncio.to_thread(
        run_ser,
        *cli_args(path, tiny_model, "--mqtt", secure_broker.tls_url,
                  "--mqtt-password-file", str(password_file(tmp_path, PUBLISHER_PASSWORD)),
                  "--mqtt-ca-file", str(pki.other_ca), "--mqtt-cert-file", str(pki.client_cert),
                  "--mqtt-key-file", str(pki.client_key)),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("stream-ser: error: cannot connect to broker mqtts://publisher@")
    assert "certificate" in line and "--mqtt-ca-file" in line
    assert done.stdout == ""


@pytest.mark.slow
async def test_tls_without_client_certificate_is_refused(
    secure_broker: SecureBroker, pki: Pki, tiny_model: Path, speech_with_pauses: tuple[Path, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    path, _ = speech_with_pauses
    env = {PASSWORD_ENV: PUBLISHER_PASSWORD}
    done = await asyncio.to_thread(
        run_ser,
        *cli_args(path, tiny_model, "--mqtt", secure_broker.tls_url, "--mqtt-ca-file", str(pki.ca),
                  "--mqtt-connect-timeout-s", "2"),
        env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    final = done.stderr.strip().splitlines()[-1]
    assert final.startswith("stream-ser: error: cannot connect to broker mqtts://")
    assert "CERTIFICATE_REQUIRED" in final and "--mqtt-cert-file" in final
    assert "Traceback" not in done.stderr
    assert PUBLISHER_PASSWORD not in done.stderr


@pytest.mark.slow
async def test_wrong_password_is_a_clear_error_at_start_up(
    secure_broker: SecureBroker, tmp_path: Path, tiny_model: Path,
    speech_with_pauses: tuple[Path, int],
) -> None:  # fmt: skip
    path, _ = speech_with_pauses
    wrong = "not-the-Password-99"
    done = await asyncio.to_thread(
        run_ser,
        *cli_args(path, tiny_model, "--mqtt", secure_broker.plain_url("publisher"),
                  "--mqtt-password-file", str(password_file(tmp_path, wrong)),
                  "--log-level", "debug"),
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "stream-ser: error: cannot connect to broker mqtt://publisher@127.0.0.1:" in done.stderr
    assert "the broker refused the connection: Not authorized" in done.stderr
    assert "--mqtt-password-file" in done.stderr  # the hint
    assert "Traceback" not in done.stderr
    assert wrong not in done.stderr and wrong not in done.stdout


@pytest.mark.slow
async def test_password_in_the_url_works_with_a_warning_and_is_never_shown(
    secure_broker: SecureBroker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    url = f"mqtt://publisher:{PUBLISHER_PASSWORD}@127.0.0.1:{secure_broker.port}"
    done, reader = await run_with_reader(
        secure_broker, *cli_args(path, tiny_model, "--mqtt", url, "--log-level", "debug")
    )
    assert done.returncode == 0, done.stderr
    assert "the broker password is part of --mqtt" in done.stderr
    assert len([m for m in reader.on("/room1/utterance") if m["final"]]) == clip_count
    assert_no_secret(done, reader, PUBLISHER_PASSWORD)


@pytest.mark.slow
async def test_acl_denial_is_surfaced_counted_and_not_retried(
    secure_broker: SecureBroker, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    path, clip_count = speech_with_pauses
    done, reader = await run_with_reader(
        secure_broker,
        *cli_args(path, tiny_model, "--mqtt", secure_broker.plain_url("limited"),
                  "--no-model-windows"),
        env={PASSWORD_ENV: LIMITED_PASSWORD},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert reader.on("/room1/utterance") == []  # the broker kept its word
    errors = [line for line in done.stderr.splitlines() if "refused a utterance message" in line]
    assert len(errors) == 1  # logged once per topic, counted every time
    assert f"{PREFIX}/room1/utterance" in errors[0] and "Not authorized" in errors[0]
    offline = reader.on("/status/secure-ser")[-1]
    assert offline["state"] == "offline"
    assert offline["counters"]["utterances"] == clip_count
    assert offline["counters"]["publish_denied"] == 2 * clip_count  # provisional and final
    assert offline["counters"]["spool_waiting"] == 0  # dropped, not kept for a retry
    assert "kept in" not in done.stderr


def test_tls_files_without_mqtts_are_refused() -> None:
    ca = str(Path(__file__))  # any existing file
    with pytest.raises(ConfigError, match="need an mqtts:// broker URL"):
        MqttSettings(url="mqtt://broker.local", ca_file=ca)
    with pytest.raises(ConfigError, match="--mqtt-key-file needs --mqtt-cert-file"):
        MqttSettings(url="mqtts://broker.local", key_file=ca)
    assert MqttSettings(url="mqtts://broker.local", ca_file=ca).ca_file == ca


def test_password_sources_and_their_precedence(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    in_url = parse_broker_url("mqtts://alice:url%40pw@host")
    assert (in_url.username, in_url.password, in_url.port) == ("alice", "url@pw", 8883)
    assert "url@pw" not in str(in_url) and "url%40pw" not in str(in_url)
    assert "the broker password is part of --mqtt" in caplog.text
    monkeypatch.setenv(PASSWORD_ENV, "from-env")
    assert parse_broker_url("mqtt://alice@host").password == "from-env"
    secret = password_file(tmp_path, "from-file")
    from_file = parse_broker_url("mqtt://alice@host", str(secret), username="bob")
    assert (from_file.username, from_file.password) == ("bob", "from-file")
    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        parse_broker_url("mqtt://host", str(empty))
    with pytest.raises(ConfigError) as bad_port:
        parse_broker_url("mqtt://alice:hunter2@host:notaport")
    assert "hunter2" not in str(bad_port.value)
    assert "hunter2" not in caplog.text
