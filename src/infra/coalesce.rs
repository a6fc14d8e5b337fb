//! Group commit: many concurrent callers each hand in one item, one task does the work for
//! whatever has gathered in a single call (one query, one transaction) and answers each.
//!
//! Reads and writes nothing itself; the work function does. Guarantees:
//! - No timer: a lone caller is served at once; under load the items that arrived while the
//!   calls in flight ran go together (at most `max` per call, at most `parallel` calls at
//!   once), so one round trip serves many.
//! - Every caller gets an answer: its own output, the call's error (shared), or
//!   [`Gone`] when the worker has stopped.
//! - The worker task ends when the last handle is dropped.

use std::error::Error;
use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

/// The shared error of one call, or of a worker that is gone.
pub type Failure = Arc<dyn Error + Send + Sync>;

type Reply<O> = oneshot::Sender<Result<O, Failure>>;

/// The worker stopped before answering.
#[derive(Debug, thiserror::Error)]
#[error("the worker that groups these calls has stopped")]
pub struct Gone;

/// A handle to hand items to one coalescing worker.
pub struct Coalescer<I, O> {
    items: mpsc::Sender<(I, Reply<O>)>,
}

impl<I: Send + 'static, O: Send + 'static> Coalescer<I, O> {
    /// Spawns the worker. `work` gets up to `max` items and must answer with one output per
    /// item, in order; up to `parallel` of its calls run at once.
    pub fn spawn<F, Fut, E>(max: usize, parallel: usize, work: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Vec<O>, E>> + Send + 'static,
        E: Error + Send + Sync + 'static,
    {
        let (max, parallel) = (max.max(1), parallel.max(1));
        let (items, mut queue) = mpsc::channel::<(I, Reply<O>)>(max * 4);
        tokio::spawn(async move {
            let mut calls = FuturesUnordered::new();
            let mut gathered = Vec::with_capacity(max);
            loop {
                tokio::select! {
                    received = queue.recv_many(&mut gathered, max), if calls.len() < parallel => {
                        if received == 0 {
                            break;
                        }
                        let (inputs, replies): (Vec<I>, Vec<Reply<O>>) = gathered.drain(..).unzip();
                        calls.push(answer(work(inputs), replies));
                    }
                    Some(()) = calls.next(), if !calls.is_empty() => {}
                }
            }
            while calls.next().await.is_some() {}
        });
        Self { items }
    }

    /// Hands in one item and waits for its output.
    pub async fn call(&self, item: I) -> Result<O, Failure> {
        let (reply, answer) = oneshot::channel();
        self.items.send((item, reply)).await.map_err(|_| Arc::new(Gone) as Failure)?;
        answer.await.map_err(|_| Arc::new(Gone) as Failure)?
    }
}

/// Runs one call and answers each of its callers.
async fn answer<O, E: Error + Send + Sync + 'static>(
    call: impl Future<Output = Result<Vec<O>, E>>,
    replies: Vec<Reply<O>>,
) {
    match call.await {
        Ok(outputs) if outputs.len() == replies.len() => {
            for (reply, output) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(output));
            }
        }
        Ok(outputs) => {
            let failure: Failure = Arc::new(Mismatch { expected: replies.len(), got: outputs.len() });
            answer_all(replies, &failure);
        }
        Err(error) => answer_all(replies, &(Arc::new(error) as Failure)),
    }
}

fn answer_all<O>(replies: Vec<Reply<O>>, failure: &Failure) {
    for reply in replies {
        let _ = reply.send(Err(failure.clone()));
    }
}

/// A work function broke its contract of one output per item.
#[derive(Debug, thiserror::Error)]
#[error("grouped work answered {got} outputs for {expected} items")]
struct Mismatch {
    expected: usize,
    got: usize,
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("refused")]
    struct Refused;

    #[tokio::test]
    async fn concurrent_callers_share_calls_and_each_gets_its_own_answer() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let doubler = Coalescer::spawn(64, 2, move |items: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                Ok::<_, Refused>(items.into_iter().map(|n| n * 2).collect::<Vec<_>>())
            }
        });
        let answers = futures::future::join_all((0..200).map(|n| doubler.call(n))).await;
        for (n, answer) in answers.into_iter().enumerate() {
            assert_eq!(answer.ok(), Some(n as u32 * 2));
        }
        assert!(calls.load(Ordering::SeqCst) < 200, "calls were grouped");
    }

    #[tokio::test]
    async fn a_failed_call_fails_each_of_its_callers() {
        let refuser = Coalescer::spawn(8, 2, |_items: Vec<u32>| async { Err::<Vec<u32>, _>(Refused) });
        let answers = futures::future::join_all((0..3).map(|n| refuser.call(n))).await;
        assert!(answers.iter().all(|answer| answer.as_ref().is_err_and(|error| error.to_string() == "refused")));
    }

    #[tokio::test]
    async fn a_short_answer_is_an_error_not_a_hang() {
        let short = Coalescer::spawn(8, 1, |_items: Vec<u32>| async { Ok::<_, Refused>(Vec::<u32>::new()) });
        assert!(short.call(1).await.is_err());
    }
}
