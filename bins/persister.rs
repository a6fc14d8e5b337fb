//! `event-persister`: stores EVENTS in PostgreSQL.

use clap::Parser;
use event_service::settings::{self, DatabaseArgs, LogArgs, NatsArgs, PersisterArgs};
use event_service::{persister::Persister, service, shutdown, telemetry};

#[derive(Parser)]
#[command(version, about = "The event-service persister stage")]
struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    persister: PersisterArgs,
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
        service::connect_and_set_up(nats_url, &args.nats, database_url, &args.database, "event-persister").await?;
    Persister::build(bus.clone(), pool, &args.persister).await?.run(token).await?;
    bus.flush_at_exit().await;
    Ok(())
}
