//! Load while a fault happens: an HTTP producer (batches through either gateway, failing over)
//! and a NATS-native producer (JetStream publish to `events.>`), each event with its own id and
//! an entity stream, each retried with the same ids until acknowledged, as a careful client
//! does. What was acknowledged, and what was sent without an answer, is what the checks hold
//! the pipeline to.

use std::collections::HashSet;
use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use uuid::Uuid;

/// Entity streams the load writes to, per producer.
pub const STREAMS: usize = 4;

/// What the producers sent.
#[derive(Default, Debug)]
pub struct Sent {
    /// Acknowledged: each must be stored exactly once.
    pub acked: HashSet<Uuid>,
    /// Sent without an acknowledgement in the end: may be stored (once) or not.
    pub unknown: HashSet<Uuid>,
    /// Requests answered with an error and retried.
    pub retries: u64,
}

pub struct Load {
    stop: Arc<AtomicBool>,
    producers: Vec<JoinHandle<Sent>>,
}

impl Load {
    /// Starts both producers; `tag` names this round's event types and streams.
    pub async fn start(gateways: Vec<String>, nats_url: &str, tag: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
        let nats = async_nats::ConnectOptions::new()
            .retry_on_initial_connect()
            .connect(nats_url.split(',').collect::<Vec<_>>())
            .await
            .expect("producer connects");
        let producers = vec![
            tokio::spawn(http_producer(http, gateways, tag.to_owned(), stop.clone())),
            tokio::spawn(nats_producer(jetstream::new(nats), tag.to_owned(), stop.clone())),
        ];
        Self { stop, producers }
    }

    /// Stops the producers once their requests in hand are answered; what they sent.
    pub async fn stop(self) -> Sent {
        self.stop.store(true, Ordering::SeqCst);
        let mut sent = Sent::default();
        for producer in self.producers {
            let one = producer.await.expect("producer");
            sent.acked.extend(one.acked);
            sent.unknown.extend(one.unknown);
            sent.retries += one.retries;
        }
        sent.unknown.retain(|id| !sent.acked.contains(id));
        sent
    }
}

/// Tries a request again this often before counting its events unknown.
const TRIES: u32 = 60;

async fn http_producer(http: reqwest::Client, gateways: Vec<String>, tag: String, stop: Arc<AtomicBool>) -> Sent {
    let mut sent = Sent::default();
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
        let batch: Vec<Value> = ids
            .iter()
            .map(|id| {
                n += 1;
                json!({"event_id": id, "event_type": format!("fault.{tag}.http"), "event_source": "backend",
                       "stream_id": format!("fault-{tag}:h{}", n % STREAMS), "data": {"n": n}})
            })
            .collect();
        let mut acked = false;
        for attempt in 0..TRIES {
            let gateway = &gateways[(n / 10 + attempt as usize) % gateways.len()];
            let answer = http.post(format!("{gateway}/api/v1/events/batch")).json(&batch).send().await;
            match answer.map(|response| response.status().as_u16()) {
                Ok(200 | 202) => {
                    acked = true;
                    break;
                }
                Ok(status) if (400..500).contains(&status) => panic!("a valid batch was refused with {status}"),
                _ => {
                    sent.retries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
        match acked {
            true => sent.acked.extend(ids),
            false => sent.unknown.extend(ids),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sent
}

async fn nats_producer(js: jetstream::Context, tag: String, stop: Arc<AtomicBool>) -> Sent {
    let mut sent = Sent::default();
    let subject = format!("events.backend.order.fault.{tag}.nats");
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        n += 1;
        let id = Uuid::now_v7();
        let body = json!({"event_id": id, "event_type": format!("fault.{tag}.nats"),
                          "entity_type": format!("fault-{tag}"), "entity_id": format!("n{}", n % STREAMS), "data": {"n": n}});
        let mut acked = false;
        for _ in 0..TRIES {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.to_string().as_str());
            let published = js.publish_with_headers(subject.clone(), headers, body.to_string().into()).await;
            let answered = match published {
                Ok(ack) => matches!(tokio::time::timeout(Duration::from_secs(5), ack.into_future()).await, Ok(Ok(_))),
                Err(_) => false,
            };
            if answered {
                acked = true;
                break;
            }
            sent.retries += 1;
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        match acked {
            true => sent.acked.insert(id),
            false => sent.unknown.insert(id),
        };
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    sent
}
