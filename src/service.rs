//! Running stages together: the all-in-one `event-service` process, the per-stage binaries'
//! shared start-up (topology and migrations), and the tests.
//!
//! Reads the settings it is given; writes the JetStream topology and the schema at start.
//! Guarantees: when one stage fails the others are cancelled, and the process stops only
//! after every stage has finished its in-flight work; the NATS client flushes last.

use std::future::Future;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::domain::Secret;
use crate::gateway::Gateway;
use crate::infra::bus::{Bus, BusError};
use crate::infra::db::{self, DbError};
use crate::infra::settings::{
    self, CallbackArgs, Common, DatabaseArgs, DispatcherArgs, GatewayArgs, Missing, NatsArgs, PersisterArgs,
    ProcessorArgs, ProjectorArgs,
};
use crate::infra::{memory, ops, shutdown, telemetry, topology};
use crate::registry::Registry;
use crate::registry::subscriptions::Subscriptions;
use crate::stages::StageError;
use crate::stages::dispatcher::Dispatcher;
use crate::stages::interest::{self, Idler};
use crate::stages::persister::Persister;
use crate::stages::processor::{Engine, ProcessorStage};
use crate::stages::projector::Projector;
use crate::stages::replayer::Replayer;
use crate::stages::sender::Sender;

/// Why the service could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Database(#[from] DbError),
    #[error(transparent)]
    Stage(#[from] StageError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error("the HTTP server failed")]
    Http(#[from] std::io::Error),
    #[error(transparent)]
    Settings(#[from] Missing),
}

/// What a single-stage binary starts with.
pub struct Started {
    pub bus: Bus,
    pub pool: PgPool,
    /// Cancelled on SIGTERM or Ctrl-C.
    pub token: CancellationToken,
    /// Flushes the exported spans when dropped, at the end of `main`.
    pub telemetry: telemetry::Telemetry,
}

/// The start of every single-stage binary: logging, the shutdown token, NATS and PostgreSQL
/// connected with the topology and schema up to date, and the ops server when
/// `EVENT_METRICS_ADDR` is set.
pub async fn start(common: &Common, client_name: &str) -> Result<Started, ServiceError> {
    let telemetry = telemetry::init(&common.log.format, client_name);
    memory::no_huge_pages();
    let token = shutdown::on_signal();
    let nats_url = settings::required(&common.nats.nats_url, "NATS_URL")?;
    let database_url = settings::required(&common.database.database_url, "DATABASE_URL")?;
    let (bus, pool) = connect_and_set_up(nats_url, &common.nats, database_url, &common.database, client_name).await?;
    if let Some(addr) = common.metrics_addr {
        ops::start(addr, bus.clone(), pool.clone(), token.clone()).await?;
    }
    Ok(Started { bus, pool, token, telemetry })
}

/// Connects to NATS and PostgreSQL and brings the topology and schema up to date.
pub async fn connect_and_set_up(
    nats_url: &Secret,
    nats: &NatsArgs,
    database_url: &Secret,
    database: &DatabaseArgs,
    client_name: &str,
) -> Result<(Bus, PgPool), ServiceError> {
    let bus =
        Bus::connect(nats_url.expose(), client_name, std::time::Duration::from_millis(nats.ack_timeout_ms)).await?;
    topology::apply(&bus, nats).await?;
    let pool = db::connect(database_url, database).await?;
    db::migrate(&pool).await?;
    bus.metrics().watch_pool(pool.clone());
    Ok((bus, pool))
}

/// The processor stage and the replayer, sharing one registry, until `token` is cancelled or
/// one fails.
pub async fn run_processing(
    bus: Bus,
    pool: PgPool,
    settings: &ProcessorArgs,
    callbacks: &CallbackArgs,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    let engine = Engine::build(&bus, &pool, callbacks).await?;
    let stage = ProcessorStage::build(bus.clone(), pool.clone(), engine.clone(), settings).await?;
    let replayer = Replayer::build(bus, pool, engine, token.clone()).await?;
    let (processed, replayed) = tokio::join!(
        cancel_all_when_done(stage.run(token.clone()), &token),
        cancel_all_when_done(replayer.run(token.clone()), &token),
    );
    Ok(processed.and(replayed)?)
}

/// The dispatcher and the sender, sharing one subscription registry, until `token` is
/// cancelled or one fails.
pub async fn run_dispatching(
    bus: Bus,
    pool: PgPool,
    settings: &DispatcherArgs,
    callbacks: &CallbackArgs,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    let registry = Registry::load(pool.clone(), Subscriptions).await.map_err(StageError::from)?;
    let dispatcher = Dispatcher::build(bus.clone(), Arc::clone(&registry)).await?;
    let sender = Sender::build(bus.clone(), pool.clone(), Arc::clone(&registry), settings, callbacks).await?;
    let follow = tokio::spawn(interest::follow_reloads(
        Idler::Dispatcher,
        bus.clone(),
        pool,
        Arc::clone(&registry),
        token.clone(),
    ));
    let watch = tokio::spawn(registry.watch(bus, token.clone()));
    let (dispatched, sent) = tokio::join!(
        cancel_all_when_done(dispatcher.run(token.clone()), &token),
        cancel_all_when_done(sender.run(token.clone()), &token),
    );
    watch.abort();
    follow.abort();
    Ok(dispatched.and(sent)?)
}

/// The projector, until `token` is cancelled or it fails.
pub async fn run_projector(
    bus: Bus,
    pool: PgPool,
    settings: &ProjectorArgs,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    Ok(Projector::build(bus, pool, settings).await?.run(token).await?)
}

/// Runs a stage; when it ends (failed or not), cancels the others.
async fn cancel_all_when_done<E>(
    stage: impl Future<Output = Result<(), E>>,
    token: &CancellationToken,
) -> Result<(), E> {
    let result = stage.await;
    token.cancel();
    result
}

/// Settings of every stage, for [`run_all`].
pub struct AllStages<'a> {
    pub gateway: &'a GatewayArgs,
    pub persister: &'a PersisterArgs,
    pub processor: &'a ProcessorArgs,
    pub dispatcher: &'a DispatcherArgs,
    pub projector: &'a ProjectorArgs,
    pub callbacks: &'a CallbackArgs,
}

/// Every stage in one process, until `token` is cancelled or one fails.
pub async fn run_all(
    bus: Bus,
    pool: PgPool,
    listener: TcpListener,
    stages: AllStages<'_>,
    token: CancellationToken,
) -> Result<(), ServiceError> {
    let AllStages { gateway, persister, processor, dispatcher, projector, callbacks } = stages;
    let gateway = Gateway::build(bus.clone(), pool.clone(), gateway, token.clone()).await?;
    let persister = Persister::build(bus.clone(), pool.clone(), persister).await?;
    let http = async { gateway.run(listener, token.clone()).await.map_err(ServiceError::from) };
    let store = async { persister.run(token.clone()).await.map_err(ServiceError::from) };
    let (http, store, processing, dispatching, projecting) = tokio::join!(
        cancel_all_when_done(http, &token),
        cancel_all_when_done(store, &token),
        cancel_all_when_done(run_processing(bus.clone(), pool.clone(), processor, callbacks, token.clone()), &token),
        cancel_all_when_done(run_dispatching(bus.clone(), pool.clone(), dispatcher, callbacks, token.clone()), &token),
        cancel_all_when_done(run_projector(bus.clone(), pool.clone(), projector, token.clone()), &token),
    );
    // The NATS client flushes last, so every ack and publish above leaves the process.
    bus.flush_at_exit().await;
    http.and(store).and(processing).and(dispatching).and(projecting)
}
