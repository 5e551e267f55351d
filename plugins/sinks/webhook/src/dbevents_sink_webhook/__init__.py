"""dbevents sink: CloudEvents over HTTP POST webhooks."""

from dbevents_sink_webhook.options import WebhookOptions
from dbevents_sink_webhook.sink import WebhookSink

__all__ = ["WebhookOptions", "WebhookSink"]
