//! Runs stages together: the all-in-one `event-service` process, the tests, and the
//! set-up step (topology and migrations) that every binary performs at start.
//!
//! Guarantees: when one stage fails the others are cancelled, and the process stops only
//! after every stage has finished its in-flight work.

use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::db;
use crate::dispatcher::Dispatching;
use crate::gateway::Gateway;
use crate::persister::Persister;
use crate::processor::{Engine, ProcessorStage};
use crate::projector::Projector;
use crate::replay::Replayer;
use crate::settings::{
    CallbackArgs, DatabaseArgs, DispatcherArgs, GatewayArgs, NatsArgs, PersisterArgs, ProcessorArgs, ProjectorArgs,
};

/// Connects to NATS and PostgreSQL and brings the topology and schema up to date.
pub async fn connect_and_set_up(
    nats_url: &str,
    nats: &NatsArgs,
    database_url: &str,
    database: &DatabaseArgs,
    client_name: &str,
) -> anyhow::Result<(Bus, PgPool)> {
    let bus = Bus::connect(nats_url, client_name, std::time::Duration::from_millis(nats.ack_timeout_ms)).await?;
    bus.apply_topology(nats).await?;
    let pool = db::connect(database_url, database).await?;
    db::migrate(&pool).await?;
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
) -> anyhow::Result<()> {
    let engine = Engine::build(&bus, &pool, callbacks).await?;
    let stage = ProcessorStage::build(bus.clone(), pool.clone(), engine.clone(), settings).await?;
    let replayer = Replayer::build(bus.clone(), pool, engine, token.clone()).await?;
    let (processed, replayed) = tokio::join!(
        cancel_all_when_done(stage.run(token.clone()), &token),
        cancel_all_when_done(replayer.run(token.clone()), &token),
    );
    processed.and(replayed)
}

/// The dispatcher and the sender, until `token` is cancelled or one fails.
pub async fn run_dispatching(
    bus: Bus,
    pool: PgPool,
    settings: &DispatcherArgs,
    callbacks: &CallbackArgs,
    token: CancellationToken,
) -> anyhow::Result<()> {
    Dispatching::build(bus, pool, settings, callbacks).await?.run(token).await
}

/// The projector, until `token` is cancelled or it fails.
pub async fn run_projector(
    bus: Bus,
    pool: PgPool,
    settings: &ProjectorArgs,
    token: CancellationToken,
) -> anyhow::Result<()> {
    Projector::build(bus, pool, settings).await?.run(token).await
}

async fn cancel_all_when_done(
    stage: impl std::future::Future<Output = anyhow::Result<()>>,
    token: &CancellationToken,
) -> anyhow::Result<()> {
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
) -> anyhow::Result<()> {
    let AllStages { gateway, persister, processor, dispatcher, projector, callbacks } = stages;
    let gateway = Gateway::build(bus.clone(), pool.clone(), gateway, token.clone()).await?;
    let persister = Persister::build(bus.clone(), pool.clone(), persister).await?;
    let processing =
        cancel_all_when_done(run_processing(bus.clone(), pool.clone(), processor, callbacks, token.clone()), &token);
    let dispatching =
        cancel_all_when_done(run_dispatching(bus.clone(), pool.clone(), dispatcher, callbacks, token.clone()), &token);
    let http = {
        let token = token.clone();
        async move {
            let result = gateway.run(listener, token.clone()).await.map_err(anyhow::Error::from);
            token.cancel();
            result
        }
    };
    let store = {
        let token = token.clone();
        async move {
            let result = persister.run(token.clone()).await;
            token.cancel();
            result
        }
    };
    let projecting = cancel_all_when_done(run_projector(bus.clone(), pool.clone(), projector, token.clone()), &token);
    let (http, store, processing, dispatching, projecting) =
        tokio::join!(http, store, processing, dispatching, projecting);
    // The NATS client flushes last, so every ack and publish above leaves the process.
    bus.flush_at_exit().await;
    http.and(store).and(processing).and(dispatching).and(projecting)
}
