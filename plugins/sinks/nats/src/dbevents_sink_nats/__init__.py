"""dbevents sink: CloudEvents published to NATS JetStream."""

from dbevents_sink_nats.options import NatsOptions
from dbevents_sink_nats.sink import NatsSink

__all__ = ["NatsOptions", "NatsSink"]
