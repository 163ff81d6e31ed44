"""Apache Kafka 3.9.1 (KRaft, one combined broker+controller node) for the local stack.

The jars come from Maven Central through ``devstack/kafka/pom.xml`` (dependencies only); the
broker runs straight from that classpath, no tarball. Layout under the state folder::

    kafka/lib/                 runtime classpath (+ .pom-sha256 marker: re-resolved on pom change)
    kafka/server.properties    generated from the settings on every start
    kafka/data/                the log dirs (formatted once with StorageTool)
    kafka/cluster.id           the cluster id given to StorageTool
    kafka/tls/                 the stack's CA and the broker's certificate (PEM, see certs.py)
    kafka/sasl/password        the SCRAM-SHA-512 password of ``stack.kafka_sasl_username`` (0600)
    logs/kafka.log             the broker's stdout (log4j INFO)
    bin/kafka-*                console tools on the same classpath, logging WARN to stderr

Listeners: ``PLAINTEXT`` on ``stack.kafka_port`` for the pipeline and tests, and (unless
``stack.kafka_sasl_port`` is 0) ``SASL_SSL`` with SCRAM-SHA-512 on ``stack.kafka_sasl_port`` to
test secured clients with certificate verification on. The SCRAM credential lives in the
cluster metadata; it is (re)created after start when a SCRAM login with the password file fails.
"""

from __future__ import annotations

import hashlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from cbtctl.stack import system
from cbtctl.stack.certs import CertFiles, ensure_certs
from cbtctl.stack.service import Service
from cbtstream.config import Settings, StackSettings
from cbtstream.errors import StackError

#: ``devstack/kafka`` of the source tree: the pom and the log4j configurations.
DEVSTACK_KAFKA = Path(__file__).resolve().parents[2] / "devstack" / "kafka"

#: Console tools written into ``<state>/bin``: script name -> main class (Kafka 3.9 names).
TOOLS: dict[str, str] = {
    "kafka-console-consumer": "org.apache.kafka.tools.consumer.ConsoleConsumer",
    "kafka-console-producer": "kafka.tools.ConsoleProducer",
    "kafka-topics": "org.apache.kafka.tools.TopicCommand",
    "kafka-consumer-groups": "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
    "kafka-configs": "kafka.admin.ConfigCommand",
}

#: The SASL mechanism of the secured listener (the strongest Kafka's SCRAM offers).
SASL_MECHANISM = "SCRAM-SHA-512"

#: Heap of the broker: a dev node with a handful of small topics never needs more.
BROKER_HEAP = ("-Xms256m", "-Xmx1g")
#: Heap of a console tool: they start often and hold one batch at a time.
TOOL_HEAP = "-Xmx256m"


def server_properties(stack: StackSettings, data_dir: Path,
                      keystore: Path | None = None) -> str:
    """The broker's ``server.properties`` for a single combined node on ``stack``'s ports.

    Pure function of the settings (unit-tested). Topics are not auto-created so a misspelt topic
    name fails loudly; our topics are created by ``create_topics`` and Faust creates its own
    through the admin API. ``keystore`` (a PEM file: key, certificate, CA) enables the
    ``SASL_SSL`` listener on ``stack.kafka_sasl_port``.
    """
    host = stack.host
    sasl = bool(stack.kafka_sasl_port) and keystore is not None
    props: dict[str, str | int] = {
        "process.roles": "broker,controller",
        "node.id": 1,
        "controller.quorum.voters": f"1@{host}:{stack.kafka_controller_port}",
        "listeners": (
            f"PLAINTEXT://{host}:{stack.kafka_port},CONTROLLER://{host}:{stack.kafka_controller_port}"
        ),
        "advertised.listeners": f"PLAINTEXT://{host}:{stack.kafka_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name": "PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "log.dirs": str(data_dir),
        "auto.create.topics.enable": "false",
        # One node: every replication factor is 1 or internal topics are never created.
        "default.replication.factor": 1,
        "offsets.topic.replication.factor": 1,
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "min.insync.replicas": 1,
        # Few partitions for the internal topics: they are created on first use, and 50 of each
        # (the default) take seconds to create on a 2-core CI machine.
        "offsets.topic.num.partitions": 4,
        "transaction.state.log.num.partitions": 4,
        "num.partitions": 1,
        # Consumer groups (and Faust workers) start consuming at once instead of after 3 s.
        "group.initial.rebalance.delay.ms": 0,
        "log.retention.hours": 168,
        "log.segment.bytes": 64 * 1024 * 1024,
    }
    if sasl:
        listener = f"SASL_SSL://{host}:{stack.kafka_sasl_port}"
        props["listeners"] = f"{props['listeners']},{listener}"
        props["advertised.listeners"] = f"{props['advertised.listeners']},{listener}"
        props["listener.security.protocol.map"] = (
            f"{props['listener.security.protocol.map']},SASL_SSL:SASL_SSL")
        prefix = "listener.name.sasl_ssl"
        props |= {
            "sasl.enabled.mechanisms": SASL_MECHANISM,
            f"{prefix}.{SASL_MECHANISM.lower()}.sasl.jaas.config": (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"),
            # KIP-651 PEM keystore: an unencrypted PKCS#8 key needs no key password.
            f"{prefix}.ssl.keystore.type": "PEM",
            f"{prefix}.ssl.keystore.location": str(keystore),
        }
    lines = ["# Generated by `cbtstream stack` from the settings; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in props.items()]
    return "\n".join(lines) + "\n"


def tool_script(java: str, tools_log4j: Path, lib: Path, main_class: str) -> str:
    """A ``sh`` wrapper that runs one Kafka console tool on the broker's classpath."""
    return (
        "#!/bin/sh\n"
        "# Generated by `cbtstream stack up`: a Kafka console tool on the stack classpath.\n"
        f"exec '{java}' {TOOL_HEAP} -Dlog4j.configuration='file:{tools_log4j}' "
        f"-cp '{lib}/*' {main_class} \"$@\"\n"
    )


def pom_hash(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


class Kafka(Service):
    """The Kafka broker of the local stack (KRaft, single node)."""

    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.home = self.state_dir / "kafka"
        self.lib = self.home / "lib"
        self.data = self.home / "data"
        self.config_file = self.home / "server.properties"
        self.bin_dir = self.state_dir / "bin"
        self.pom = DEVSTACK_KAFKA / "pom.xml"
        self.log4j = DEVSTACK_KAFKA / "log4j.properties"
        self.tools_log4j = DEVSTACK_KAFKA / "tools-log4j.properties"
        self.tls_dir = self.home / "tls"
        self.sasl_password_file = self.home / "sasl" / "password"

    def ports(self) -> list[int]:
        stack = self.settings.stack
        ports = [stack.kafka_port, stack.kafka_controller_port]
        return [*ports, stack.kafka_sasl_port] if stack.kafka_sasl_port else ports

    @property
    def sasl_enabled(self) -> bool:
        return bool(self.settings.stack.kafka_sasl_port)

    @property
    def sasl_bootstrap(self) -> str:
        return f"{self.settings.stack.host}:{self.settings.stack.kafka_sasl_port}"

    @property
    def certs(self) -> CertFiles:
        return CertFiles(self.tls_dir)

    @property
    def bootstrap(self) -> str:
        return f"{self.settings.stack.host}:{self.settings.stack.kafka_port}"

    def endpoint(self) -> str:
        if not self.sasl_enabled:
            return f"bootstrap servers {self.bootstrap}"
        return (f"bootstrap servers {self.bootstrap} (PLAINTEXT), {self.sasl_bootstrap} "
                f"(SASL_SSL {SASL_MECHANISM}, user {self.settings.stack.kafka_sasl_username}, "
                f"password file {self.sasl_password_file}, CA {self.certs.ca_cert})")

    # -- install ------------------------------------------------------------------------------
    def install(self) -> None:
        system.ensure_tools((system.JAVA, system.MAVEN, system.KCAT))
        self.resolve_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(self.rendered_config())
        self.format_storage()
        self.write_tools()

    def rendered_config(self) -> str:
        """``server.properties`` for the current settings (creates certificates and the SCRAM
        password on first use)."""
        keystore = None
        if self.sasl_enabled:
            keystore = ensure_certs(self.tls_dir).server_keystore
            self.sasl_password()
        return server_properties(self.settings.stack, self.data, keystore)

    def restart_needed(self) -> str | None:
        """Why the running broker must be restarted to match the settings, or None."""
        try:
            current = self.config_file.read_text()
        except OSError:
            return None
        if current == self.rendered_config():
            return None
        return (f"{self.config_file} differs from the settings (e.g. the SASL_SSL listener); "
                "restart Kafka (`cbtstream stack down` and `up`) to apply it")

    def sasl_password(self) -> str:
        """The SCRAM password of the stack's user, generated once (kept in a 0600 file)."""
        path = self.sasl_password_file
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.parent.chmod(0o700)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(secrets.token_urlsafe(24) + "\n")
            tmp.chmod(0o600)
            tmp.replace(path)
        return path.read_text().strip()

    def resolve_jars(self) -> bool:
        """Copy the runtime classpath from Maven; False if the marker says it is up to date."""
        marker = self.lib / ".pom-sha256"
        digest = pom_hash(self.pom)
        if marker.is_file() and marker.read_text().strip() == digest:
            return False
        staging = self.home / "lib.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        system.run(
            [
                "mvn", "-B", "-q", "-f", str(self.pom), "dependency:copy-dependencies",
                "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
            ],
            timeout=900,
        )
        (staging / ".pom-sha256").write_text(digest + "\n")
        shutil.rmtree(self.lib, ignore_errors=True)
        staging.rename(self.lib)  # atomic: a half-copied classpath is never used
        return True

    def java(self, main_class: str, *args: str, log4j: Path | None = None) -> list[str]:
        java = shutil.which("java") or "java"
        return [
            java, TOOL_HEAP, f"-Dlog4j.configuration=file:{log4j or self.tools_log4j}",
            "-cp", f"{self.lib}/*", main_class, *args,
        ]

    def format_storage(self) -> None:
        """Format the log dirs once (KRaft needs a cluster id in ``meta.properties``)."""
        if (self.data / "meta.properties").is_file():
            return
        id_file = self.home / "cluster.id"
        if not id_file.is_file():
            cluster_id = system.run(self.java("kafka.tools.StorageTool", "random-uuid")).strip()
            if not cluster_id:
                raise StackError("kafka StorageTool random-uuid printed nothing")
            id_file.write_text(cluster_id + "\n")
        cluster_id = id_file.read_text().strip()
        system.run(self.java(
            "kafka.tools.StorageTool", "format", "-t", cluster_id,
            "-c", str(self.config_file), "--ignore-formatted",
        ))

    def write_tools(self) -> None:
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        java = shutil.which("java") or "java"
        for script, main_class in TOOLS.items():
            path = self.bin_dir / script
            path.write_text(tool_script(java, self.tools_log4j, self.lib, main_class))
            path.chmod(0o755)

    # -- run ----------------------------------------------------------------------------------
    def command(self) -> tuple[Sequence[str], Mapping[str, str] | None]:
        java = shutil.which("java") or "java"
        logs = self.log_file.parent
        argv = [
            java, *BROKER_HEAP,
            f"-Dlog4j.configuration=file:{self.log4j}", f"-Dkafka.logs.dir={logs}",
            "-cp", f"{self.lib}/*", "kafka.Kafka", str(self.config_file),
        ]
        return argv, None

    def after_ready(self) -> None:
        """Create the SCRAM credential of the stack's user unless a SCRAM login works already
        (or the running broker predates the listener: ``stack up`` then says a restart is
        needed)."""
        if not self.sasl_enabled or self.restart_needed() or self.sasl_probe():
            return
        user = self.settings.stack.kafka_sasl_username
        system.run(self.java(
            "kafka.admin.ConfigCommand", "--bootstrap-server", self.bootstrap, "--alter",
            "--entity-type", "users", "--entity-name", user,
            "--add-config", f"{SASL_MECHANISM}=[password={self.sasl_password()}]",
        ))
        for _ in range(40):
            if self.sasl_probe():
                return
            time.sleep(0.25)
        raise StackError(f"kafka: SCRAM login as {user} on {self.sasl_bootstrap} still fails "
                         f"after creating the credential; see {self.log_file}")

    def sasl_probe(self) -> bool:
        """True when a SCRAM login over TLS (CA verified) answers a metadata request."""
        conf = self.sasl_password_file.parent / "kcat.conf"
        conf.write_text(
            "security.protocol=SASL_SSL\n"
            f"sasl.mechanisms={SASL_MECHANISM}\n"
            f"sasl.username={self.settings.stack.kafka_sasl_username}\n"
            f"sasl.password={self.sasl_password()}\n"
            f"ssl.ca.location={self.certs.ca_cert}\n"
        )
        conf.chmod(0o600)
        try:
            proc = subprocess.run(
                ["kcat", "-F", str(conf), "-L", "-b", self.sasl_bootstrap, "-m", "3", "-J"],
                capture_output=True, timeout=15, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0 and b'"brokers":[{' in proc.stdout.replace(b" ", b"")

    def probe(self) -> bool:
        """True when the broker answers a metadata request (``kcat -L``) within 2 s."""
        try:
            proc = subprocess.run(
                ["kcat", "-L", "-b", self.bootstrap, "-m", "2", "-J"],
                capture_output=True,
                timeout=10,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0 and b'"brokers":[{' in proc.stdout.replace(b" ", b"")
