//! What operators configure and the stages follow: processors, subscriptions, projection
//! definitions and event schemas. Each kind owns its table, its request validation and its in-memory set; this
//! module holds the one mechanism that keeps a set live in every process.
//!
//! Reads the registry tables; publishes and listens to one core-NATS change subject per kind.
//! Guarantees: a process sees a change within a second (notification) and within
//! [`RELOAD_EVERY`] even if the notification is lost; readers take a consistent snapshot
//! without waiting for a reload.

pub mod definitions;
pub mod processors;
pub mod schemas;
pub mod subscriptions;

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures::StreamExt;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::infra::bus::Bus;

/// How often a registry reloads even without a change notification.
pub const RELOAD_EVERY: Duration = Duration::from_secs(15);

/// One kind of registered thing: how its live set is loaded and where its changes are
/// announced.
pub trait Source: Send + Sync + 'static {
    /// The set the stages read, built from the table in one go.
    type Set: Default + Send + Sync + 'static;
    /// What this is, for logs.
    const NAME: &'static str;
    /// The core-NATS subject that announces a change.
    const CHANGED: &'static str;

    fn load(&self, pool: &PgPool) -> impl Future<Output = Result<Self::Set, sqlx::Error>> + Send;
}

/// The live set of one kind, in one process.
pub struct Registry<S: Source> {
    pool: PgPool,
    source: S,
    current: RwLock<Arc<S::Set>>,
    /// Marked after every reload, for those who follow the set ([`Self::reloads`]).
    reloaded: tokio::sync::watch::Sender<()>,
}

impl<S: Source> Registry<S> {
    /// Loads the set now (fails when PostgreSQL cannot be read).
    pub async fn load(pool: PgPool, source: S) -> Result<Arc<Self>, sqlx::Error> {
        let registry = Arc::new(Self {
            pool,
            source,
            current: RwLock::new(Arc::default()),
            reloaded: tokio::sync::watch::Sender::new(()),
        });
        registry.reload().await?;
        Ok(registry)
    }

    /// The set as it is now; cheap, and consistent for as long as it is held.
    pub fn snapshot(&self) -> Arc<S::Set> {
        match self.current.read() {
            Ok(current) => current.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub async fn reload(&self) -> Result<(), sqlx::Error> {
        let set = Arc::new(self.source.load(&self.pool).await?);
        match self.current.write() {
            Ok(mut current) => *current = set,
            Err(poisoned) => *poisoned.into_inner() = set,
        }
        self.reloaded.send_replace(());
        Ok(())
    }

    /// Wakes (`changed()`) after each reload from now on, with or without a change.
    pub fn reloads(&self) -> tokio::sync::watch::Receiver<()> {
        self.reloaded.subscribe()
    }

    /// Reloads on every change notification and every [`RELOAD_EVERY`], until cancelled.
    pub async fn watch(self: Arc<Self>, bus: Bus, token: CancellationToken) {
        let mut changes = match bus.client().subscribe(S::CHANGED).await {
            Ok(changes) => Some(changes),
            Err(error) => {
                tracing::warn!(registry = S::NAME, error = %error, "cannot subscribe to changes; reloading on a timer only");
                None
            }
        };
        // A change announced between the first load and the subscription would wait for the
        // timer: load once more now that changes are heard.
        if let Err(error) = self.reload().await {
            tracing::warn!(registry = S::NAME, error = %error, "cannot reload");
        }
        let mut timer = tokio::time::interval(RELOAD_EVERY);
        timer.tick().await;
        loop {
            let next = async {
                match changes.as_mut() {
                    Some(changes) => changes.next().await.is_some(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = token.cancelled() => return,
                _ = timer.tick() => {}
                alive = next => if !alive { changes = None },
            }
            if let Err(error) = self.reload().await {
                tracing::warn!(registry = S::NAME, error = %error, "cannot reload");
            }
        }
    }
}

/// Tells every process to reload `S`. Best effort: they also reload on a timer.
pub async fn announce_change<S: Source>(bus: &Bus) {
    if let Err(error) = bus.notify(S::CHANGED.to_owned(), bytes::Bytes::new()).await {
        tracing::warn!(registry = S::NAME, error = %error,
            "cannot announce a change; processes pick it up on their next reload");
    }
}
