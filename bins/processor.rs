//! `event-processor`: runs the registered processors on EVENTS, and replay jobs.

use clap::Parser;
use event_service::settings::{self, CallbackArgs, DatabaseArgs, LogArgs, NatsArgs, ProcessorArgs};
use event_service::{service, shutdown, telemetry};

#[derive(Parser)]
#[command(version, about = "The event-service processor stage (processors and replays)")]
struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    processor: ProcessorArgs,
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
        service::connect_and_set_up(nats_url, &args.nats, database_url, &args.database, "event-processor").await?;
    service::run_processing(bus.clone(), pool, &args.processor, &args.callbacks, token).await?;
    bus.flush_at_exit().await;
    Ok(())
}
