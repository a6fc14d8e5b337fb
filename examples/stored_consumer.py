"""Read stored events from STORED with a durable consumer of your own (nats-py)."""
import asyncio
import json
import os

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

STREAM = "STORED"
DURABLE = os.environ.get("DURABLE", "billing")
# event.stored.{source}.{category}.{type}: here every order.* event from any source.
FILTER = os.environ.get("FILTER", "event.stored.*.*.order.>")


async def main():
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    js = nc.jetstream()
    # Created once; the server remembers how far you got, across your restarts.
    await js.add_consumer(
        STREAM,
        ConsumerConfig(
            durable_name=DURABLE,
            filter_subject=FILTER,
            deliver_policy=DeliverPolicy.ALL,  # or BY_START_TIME / BY_START_SEQUENCE
            ack_policy=AckPolicy.EXPLICIT,
            max_ack_pending=1000,
        ),
    )
    sub = await js.pull_subscribe_bind(DURABLE, stream=STREAM)
    while True:
        try:
            messages = await sub.fetch(100, timeout=5)
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            if os.environ.get("EXIT_WHEN_IDLE"):
                break
            continue
        for message in messages:
            event = json.loads(message.data)  # jetstream/schemas/stored-event.v1.json
            headers = message.headers or {}
            print(json.dumps({
                "event_id": event["event_id"],
                "event_type": event["event_type"],
                "stream_seq": event["stream_seq"],
                "ce_type": headers.get("ce-type"),
                "schema_version": headers.get("Event-Service-Schema-Version"),
            }), flush=True)
            await message.ack()
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main())
