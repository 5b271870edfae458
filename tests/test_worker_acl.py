"""docs/security.md's ACL file, as documented, against a real mosquitto; SUBACK refusals."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from stream_ser.mqtt import PASSWORD_ENV, broker_client, parse_broker_url
from stream_ser.settings import MqttSettings
from tests.conftest import REPO, Broker

PASSWORDS = {"ser-kitchen": "kitchen-Secret-1", "dashboard": "dash-Secret-2", "porch": "porch-3"}


def documented_acl() -> str:
    """The ACL file block of docs/security.md, as a reader would copy it."""
    text = (REPO / "docs" / "security.md").read_text()
    blocks: list[str] = re.findall(r"```\n(# /etc/mosquitto/acl.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


class AclBroker(Broker):
    """mosquitto with the documented ACL file and a password per user."""

    def __init__(self, directory: Path, acl: str) -> None:
        super().__init__(directory)
        passwords = directory / "passwords"
        for index, (user, password) in enumerate(PASSWORDS.items()):
            create = ["-c"] if index == 0 else []
            subprocess.run(["mosquitto_passwd", *create, "-b", str(passwords), user, password],
                           check=True, capture_output=True, timeout=30)  # fmt: skip
        (directory / "acl").write_text(acl)
        self.config.write_text(
            f"user {getpass.getuser()}\nper_listener_settings false\nallow_anonymous false\n"
            f"password_file {passwords}\nacl_file {directory / 'acl'}\npersistence false\n"
            f"listener {self.port} 127.0.0.1\n"
        )

    def url(self, user: str) -> str:  # type: ignore[override]
        return f"mqtt://{user}@127.0.0.1:{self.port}"


def start_worker(
    broker: AclBroker | DynsecBroker, user: str, model: Path, spool: Path
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_ser", "run", "--mqtt-audio", "--mqtt", broker.url(user),
         "--mqtt-client-id", "wk", "--model", str(model), "--no-model-windows",
         "--no-descriptors", "--mqtt-spool-dir", str(spool)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=os.environ | {PASSWORD_ENV: PASSWORDS[user]},
    )  # fmt: skip


async def collect_finals(broker: AclBroker, topic: str, count: int, timeout_s: float) -> list[Any]:
    """Final results on `topic` until `count` of them, as the dashboard user."""
    received: list[Any] = []
    async with aiomqtt.Client("127.0.0.1", broker.port, username="dashboard",
                              password=PASSWORDS["dashboard"]) as client:  # fmt: skip
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                result = json.loads(message.payload)
                if result["final"]:
                    received.append(result)
                if len(received) >= count:
                    break
    return received


@pytest.mark.slow
async def test_the_documented_acl_lets_a_worker_and_a_device_work_and_nothing_more(
    tmp_path: Path, tiny_model: Path, speech_with_pauses: tuple[Path, int]
) -> None:
    """Item 11: the device rule did not match the real topics and the worker had no rights."""
    path, clip_count = speech_with_pauses
    broker = AclBroker(tmp_path, documented_acl())
    broker.start()
    worker = start_worker(broker, "ser-kitchen", tiny_model, tmp_path / "spool")
    try:
        finals = asyncio.create_task(
            collect_finals(broker, "stream-ser/porch/utterance", clip_count, 60)
        )
        await asyncio.sleep(3.0)  # the worker is subscribed
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "stream_ser", "send", "--input", str(path), "--stream-id",
            "porch", "--speed", "4", "--mqtt", broker.url("porch"), cwd=REPO,
            env=os.environ | {PASSWORD_ENV: PASSWORDS["porch"]},
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, errors = await asyncio.wait_for(sender.communicate(), 60)
        assert sender.returncode == 0, errors.decode()
        assert b"the broker refused" not in errors
        assert len(await finals) == clip_count
        # the device may not send under another stream's id
        settings = MqttSettings(url=broker.url("porch"))
        address = parse_broker_url(broker.url("porch"))
        address = type(address)(address.host, address.port, False, "porch", PASSWORDS["porch"])
        async with broker_client(settings, address, "porch-test") as device:
            refusal = await device.publish_checked("stream-ser/audio/kitchen/pcm", b"x", 1)
            assert refusal is not None and refusal.value == 0x87
        assert worker.poll() is None
    finally:
        worker.terminate()
        _, stderr = worker.communicate(timeout=30)
        broker.stop()
    assert "refused the subscription" not in stderr and "Traceback" not in stderr


class DynsecBroker(Broker):
    """mosquitto with the dynamic-security plugin, which (unlike an acl_file) refuses a
    subscription in its SUBACK; `wk` may connect, and do nothing else."""

    PLUGIN = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        if not self.PLUGIN.is_file() or shutil.which("mosquitto_ctrl") is None:
            pytest.fail(f"mosquitto's dynamic-security plugin is not installed ({self.PLUGIN})")
        config = directory / "dynsec.json"
        subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(config), "admin", "admin-pw"],
                       check=True, capture_output=True, timeout=30)  # fmt: skip
        self.config.write_text(
            f"user {getpass.getuser()}\nper_listener_settings false\npersistence false\n"
            f"plugin {self.PLUGIN}\nplugin_opt_config_file {config}\n"
            f"listener {self.port} 127.0.0.1\n"
        )

    def start(self) -> None:
        super().start()
        subprocess.run(["mosquitto_ctrl", "-u", "admin", "-P", "admin-pw", "-p", str(self.port),
                        "dynsec", "createClient", "ser-kitchen", "-p", PASSWORDS["ser-kitchen"]],
                       check=True, capture_output=True, timeout=30)  # fmt: skip

    def url(self, user: str) -> str:  # type: ignore[override]
        return f"mqtt://{user}@127.0.0.1:{self.port}"


async def test_a_worker_whose_subscriptions_are_refused_fails_loudly(
    tmp_path: Path, tiny_model: Path
) -> None:
    """Item 11: a worker whose subscriptions the broker refused logged `listening` and
    received nothing, forever."""
    broker = DynsecBroker(tmp_path)
    broker.start()
    worker = start_worker(broker, "ser-kitchen", tiny_model, tmp_path / "spool")
    try:
        _, stderr = await asyncio.to_thread(worker.communicate, timeout=40)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
        broker.stop()
    assert worker.returncode == 1, stderr
    assert "the broker refused the subscription to stream-ser/" in stderr
    assert "Not authorized" in stderr and "Traceback" not in stderr
    assert "listening for remote audio" not in stderr
