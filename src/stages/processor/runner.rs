//! Running processors' actions on events: a webhook call (through the one callback path), a
//! NATS request, or a publish. Shared by the processor stage and the replayer.
//!
//! Reads the processor set it is given; writes HTTP requests and NATS messages. Guarantees:
//! a processor's failure never stops the processors after it; every run is timed and judged
//! the same way wherever it runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use tracing::Instrument;

use super::verdict::{self, Ran, RunOutcome};
use crate::domain::{Event, ResultStatus};
use crate::infra::bus::Bus;
use crate::infra::callback::{self, Callbacks, Posted, Verdict};
use crate::infra::metrics::RunLabels;
use crate::infra::telemetry;
use crate::registry::processors::{Action, Runnable};
use crate::store::processing::RunResult;
use crate::wire::{Outgoing, TraceContext, headers};

const CAPTURE_CACHE_FOR: Duration = Duration::from_secs(30);

/// Runs processors' actions. One per process; cheap to share.
pub struct Runner {
    bus: Bus,
    callbacks: Callbacks,
    /// Whether a stream captures a subject, so a publish can wait for its PubAck.
    captured: Mutex<HashMap<String, (bool, Instant)>>,
}

impl Runner {
    pub fn new(bus: Bus, callbacks: Callbacks) -> Self {
        Self { bus, callbacks, captured: Mutex::new(HashMap::new()) }
    }

    /// Runs processors on one event one after another, in the order given (highest priority
    /// first); a failure never stops the ones after it. `last_attempt` says whether a
    /// processor at an attempt has no retries left after it.
    pub async fn run_in_order(
        &self,
        event: &Event,
        payload: &Bytes,
        processors: &[(Arc<Runnable>, i32)],
        run_id: &str,
        trace: &TraceContext,
        last_attempt: impl Fn(&Runnable, i32) -> bool,
    ) -> Vec<Ran> {
        let mut ran = Vec::with_capacity(processors.len());
        for (runnable, attempt) in processors {
            let started = Instant::now();
            let span = tracing::info_span!("processor_run", processor = runnable.name(), event_id = %event.event_id,
                trace_id = %trace.trace_id_hex());
            let call = telemetry::within(&span, trace);
            let outcome = self.run(runnable, event, payload, run_id, &call).instrument(span).await;
            let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
            let status = verdict::result_status(&outcome, last_attempt(runnable, *attempt));
            let labels = RunLabels { processor: runnable.name().to_owned(), outcome: status.as_str() };
            self.bus.metrics().processor_runs.get_or_create(&labels).inc();
            if status != ResultStatus::Success {
                tracing::info!(event_id = %event.event_id, trace_id = %trace.trace_id_hex(), processor = runnable.name(),
                    attempt, status = %status, message = outcome.message(), "processor did not succeed");
            }
            ran.push(Ran {
                retry_after: outcome.retry_after(),
                gone: matches!(outcome, RunOutcome::Gone(_)),
                result: RunResult {
                    event_id: event.event_id,
                    processor_id: runnable.processor.processor_id.clone(),
                    processor_name: runnable.name().to_owned(),
                    run_id: run_id.to_owned(),
                    attempt: *attempt,
                    status,
                    message: Some(outcome.into_message()),
                    duration_ms,
                    processed_at: Utc::now(),
                },
            });
        }
        ran
    }

    /// Runs one processor on one event. `payload` is the event's JSON; every call carries
    /// `trace` on.
    async fn run(
        &self,
        runnable: &Runnable,
        event: &Event,
        payload: &Bytes,
        run_id: &str,
        trace: &TraceContext,
    ) -> RunOutcome {
        match &runnable.action {
            Action::Webhook { url, secret, timeout } => {
                let webhook_id = format!("{}.{}", event.event_id, runnable.name());
                let trace_headers = trace.headers();
                let mut headers = vec![("event-service-processor", runnable.name())];
                headers.extend(trace_headers.iter().map(|(name, value)| (*name, value.as_str())));
                let request = callback::Request {
                    url,
                    body: payload,
                    headers,
                    timeout: Some(*timeout),
                    signed: secret.as_ref().map(|secret| (vec![secret.expose()], webhook_id.as_str())),
                };
                match self.callbacks.post(request).await {
                    Posted::Refused(error) => RunOutcome::Failed(format!("callback URL {error}")),
                    Posted::Answered(answer) => match answer.verdict {
                        Verdict::Success => RunOutcome::Succeeded(answer.detail),
                        Verdict::Retry { after } => RunOutcome::Retryable { message: answer.detail, after },
                        Verdict::Gone => RunOutcome::Gone(answer.detail),
                        Verdict::Fail => RunOutcome::Failed(answer.detail),
                    },
                }
            }
            Action::Request { subject, timeout } => {
                self.request(runnable, event, payload, (subject, *timeout), trace).await
            }
            Action::Publish { template } => {
                let subject = Action::publish_subject(template, event);
                let message_id = format!("{}.{}.{run_id}", event.event_id, runnable.name());
                match self.publish(subject.clone(), &message_id, payload, trace).await {
                    Ok(Some(sequence)) => {
                        RunOutcome::Succeeded(format!("published to {subject} (stream sequence {sequence})"))
                    }
                    Ok(None) => RunOutcome::Succeeded(format!("published to {subject} (no stream captures it)")),
                    Err(error) => RunOutcome::retry(format!("publish to {subject}: {error}")),
                }
            }
        }
    }

    async fn request(
        &self,
        runnable: &Runnable,
        event: &Event,
        payload: &Bytes,
        (subject, timeout): (&str, Duration),
        trace: &TraceContext,
    ) -> RunOutcome {
        let mut request_headers = async_nats::HeaderMap::new();
        for (name, value) in trace.headers() {
            request_headers.insert(name, value.as_str());
        }
        request_headers.insert(headers::EVENT_ID, event.event_id.to_string().as_str());
        request_headers.insert(headers::PROCESSOR, runnable.name());
        let request = self.bus.client().request_with_headers(subject.to_owned(), request_headers, payload.clone());
        let reply = match tokio::time::timeout(timeout, request).await {
            Err(_) => return RunOutcome::retry(format!("no reply on {subject} within {} ms", timeout.as_millis())),
            Ok(Err(error)) => {
                return RunOutcome::retry(match error.kind() {
                    async_nats::RequestErrorKind::NoResponders => format!("no responders on {subject}"),
                    async_nats::RequestErrorKind::TimedOut => format!("no reply on {subject} in time"),
                    _ => format!("request on {subject} failed: {error}"),
                });
            }
            Ok(Ok(reply)) => reply,
        };
        let service_error = reply.headers.as_ref().and_then(|reply_headers| {
            let text = reply_headers.get(headers::SERVICE_ERROR).map(|value| value.as_str().to_owned());
            let code = reply_headers.get(headers::SERVICE_ERROR_CODE).map(|value| value.as_str().to_owned());
            match (code, text) {
                (None, None) => None,
                (code, text) => {
                    Some(format!("service error {}: {}", code.unwrap_or_default(), text.unwrap_or_default()))
                }
            }
        });
        match service_error {
            Some(error) => RunOutcome::retry(callback::clip(&error)),
            None => RunOutcome::Succeeded(callback::clip(&format!(
                "replied on {subject}: {}",
                String::from_utf8_lossy(&reply.payload)
            ))),
        }
    }

    /// Publishes where a processor or a replay's target service reads: with a PubAck (and the
    /// stream sequence) when a stream captures the subject, as a core-NATS message otherwise.
    pub async fn publish(
        &self,
        subject: String,
        message_id: &str,
        payload: &Bytes,
        trace: &TraceContext,
    ) -> Result<Option<u64>, crate::infra::bus::BusError> {
        let captured = self.is_captured(&subject).await;
        let message = Outgoing::with_id(subject, message_id, payload.clone()).with_trace(trace);
        if captured {
            Ok(Some(self.bus.publish(message).await?.sequence))
        } else {
            self.bus.notify_message(message).await?;
            Ok(None)
        }
    }

    async fn is_captured(&self, subject: &str) -> bool {
        if let Ok(cache) = self.captured.lock()
            && let Some((captured, at)) = cache.get(subject)
            && at.elapsed() < CAPTURE_CACHE_FOR
        {
            return *captured;
        }
        let captured = self.bus.jetstream().stream_by_subject(subject).await.is_ok();
        if let Ok(mut cache) = self.captured.lock() {
            if cache.len() > 10_000 {
                cache.clear();
            }
            cache.insert(subject.to_owned(), (captured, Instant::now()));
        }
        captured
    }
}
