//! `event-dispatcher`: queues subscription deliveries (EVENTS → DELIVERIES) and sends them.

use clap::Parser;
use event_service::settings::{self, CallbackArgs, DatabaseArgs, DispatcherArgs, LogArgs, NatsArgs};
use event_service::{service, shutdown, telemetry};

#[derive(Parser)]
#[command(version, about = "The event-service dispatcher and sender (subscription webhooks)")]
struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    dispatcher: DispatcherArgs,
    #[command(flatten)]
    callbacks: CallbackArgs,
    #[command(flatten)]
    log: LogArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    telemetry::init(&args.log.format);
    let token = shutdown::on_signal();
    let nats_url = settings::required(&args.nats.nats_url, "NATS_URL")?;
    let database_url = settings::required(&args.database.database_url, "DATABASE_URL")?;
    let (bus, pool) =
        service::connect_and_set_up(nats_url, &args.nats, database_url, &args.database, "event-dispatcher").await?;
    service::run_dispatching(bus.clone(), pool, &args.dispatcher, &args.callbacks, token).await?;
    bus.flush_at_exit().await;
    Ok(())
}
