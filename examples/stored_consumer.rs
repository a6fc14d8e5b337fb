//! Reads stored events from STORED with a durable consumer of your own (async-nats).
//!
//! `NATS_URL=nats://127.0.0.1:4222 cargo run --example stored_consumer`

use async_nats::jetstream::{self, consumer::AckPolicy, consumer::DeliverPolicy, consumer::pull};
use futures::StreamExt;

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
    let jetstream = jetstream::new(async_nats::connect(url).await?);
    let stored = jetstream.get_stream("STORED").await?;
    // Created once; the server remembers how far you got, across your restarts.
    let consumer = stored
        .get_or_create_consumer(
            "billing",
            pull::Config {
                durable_name: Some("billing".to_owned()),
                // event.stored.{source}.{category}.{type}: every order.* event from any source.
                filter_subject: "event.stored.*.*.order.>".to_owned(),
                deliver_policy: DeliverPolicy::All, // or ByStartTime / ByStartSequence
                ack_policy: AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    while let Some(message) = messages.next().await {
        let message = message?;
        // The payload follows jetstream/schemas/stored-event.v1.json.
        let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
        println!("{} {} (EVENTS #{})", event["event_type"], event["event_id"], event["stream_seq"]);
        message.ack().await?;
    }
    Ok(())
}
