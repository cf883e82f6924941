"""What a local broker runs with: ``server.properties`` and the logging configuration.

One single-node KRaft cluster (``process.roles=broker,controller``) on loopback, tuned for a
small machine and for tests that stop, kill and restart it: every internal topic satisfiable
with one replica, short broker sessions, no initial rebalance delay. The logging configuration
depends on the Kafka major version (log4j 1 syntax for 3.x, log4j2 for 4.x); both write
``logs/server.log``, which start-up failures quote.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from headrace.runtime.localkafka.jars import major

#: Kafka 3.x: slf4j -> reload4j, log4j 1 syntax (-Dlog4j.configuration)
LOG4J1_TEMPLATE = """\
log4j.rootLogger=INFO, file
log4j.appender.file=org.apache.log4j.RollingFileAppender
log4j.appender.file.File={log_file}
log4j.appender.file.MaxFileSize=20MB
log4j.appender.file.MaxBackupIndex=2
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
log4j.logger.kafka.request.logger=WARN
log4j.logger.kafka.network.RequestChannel$=WARN
log4j.logger.state.change.logger=WARN
log4j.logger.kafka.log.LogCleaner=INFO
log4j.logger.org.apache.kafka.raft=WARN
log4j.logger.org.apache.kafka.controller=INFO
"""

SERVER_PROPERTIES_TEMPLATE = """\
# Rendered by runtime/localkafka/config.py on every start; edit the code, not this file.
process.roles=broker,controller
node.id={node_id}
controller.quorum.voters={node_id}@{host}:{controller_port}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port}
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data_dir}

# Single node: every internal topic must be satisfiable with one replica, or transactions
# and consumer groups hang waiting for replicas that will never exist.
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
# Fewer internal partitions: the coordinator loads faster after every (re)start, which is
# what recovery tests wait on. Semantics are unchanged.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
num.partitions=1
auto.create.topics.enable={auto_create}

# Tests start consumer groups constantly; the default 3 s join delay only slows them down.
group.initial.rebalance.delay.ms=0

# After a crash (SIGKILL) the restarted broker cannot register until the controller expires
# the dead incarnation's session (default 9 s). Recovery tests kill the broker on purpose,
# so keep the session short; heartbeats are on loopback inside one JVM, so 500 ms is cheap.
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000

# Small machine (2 cores, broker heap <= 512 MiB): the cleaner's default 128 MiB dedupe
# buffer would take a quarter of the heap. Compaction (changelog topics) still works.
log.cleaner.dedupe.buffer.size=16777216
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=2
"""


#: Kafka 4.x: log4j2 properties syntax (-Dlog4j2.configurationFile); the same file and levels.
#: ``shutdownHook = disable``: log4j2's own JVM shutdown hook runs concurrently with Kafka's and
#: stops the appenders while the broker is still shutting down, so a 4.x server.log would end a
#: few lines after SIGTERM (3.x logs the whole controlled shutdown). The appender flushes every
#: line (immediateFlush), so nothing is lost when the JVM exits without stopping log4j2.
LOG4J2_TEMPLATE = """\
status = warn
shutdownHook = disable
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {log_file}
appender.file.filePattern = {log_file}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.channel.name = kafka.network.RequestChannel$
logger.channel.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.raft.name = org.apache.kafka.raft
logger.raft.level = WARN
"""


def logging_config(version: str, log_file: Path) -> tuple[str, str, str]:
    """(file name, contents, JVM flag) of the logging configuration for ``version``."""
    if major(version) < 4:
        return (
            "log4j.properties",
            LOG4J1_TEMPLATE.format(log_file=log_file),
            "-Dlog4j.configuration=file:",
        )
    return (
        "log4j2.properties",
        LOG4J2_TEMPLATE.format(log_file=log_file),
        "-Dlog4j2.configurationFile=",
    )


def sasl_listener(config: str, host: str, port: int, users: Mapping[str, str]) -> str:
    """``config`` with a second client listener, SASL_PLAINTEXT with mechanism PLAIN for
    ``users`` (user -> password); the PLAINTEXT listener stays for the broker itself."""
    lines = []
    for line in config.splitlines():
        if line.startswith("listeners=") or line.startswith("advertised.listeners="):
            line += f",SASL_PLAINTEXT://{host}:{port}"
        elif line.startswith("listener.security.protocol.map="):
            line += ",SASL_PLAINTEXT:SASL_PLAINTEXT"
        lines.append(line)
    entries = " ".join(f'user_{user}="{password}"' for user, password in users.items())
    lines += [
        "sasl.enabled.mechanisms=PLAIN",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config="
        f"org.apache.kafka.common.security.plain.PlainLoginModule required {entries};",
    ]
    return "\n".join(lines) + "\n"
