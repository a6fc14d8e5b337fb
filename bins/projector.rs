//! `event-projector`: keeps entity projections up to date (one active, the others standby).

use clap::Parser;
use event_service::settings::{self, DatabaseArgs, LogArgs, NatsArgs, ProjectorArgs};
use event_service::{service, shutdown, telemetry};

#[derive(Parser)]
#[command(version, about = "The event-service projector stage")]
struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    projector: ProjectorArgs,
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
        service::connect_and_set_up(nats_url, &args.nats, database_url, &args.database, "event-projector").await?;
    service::run_projector(bus.clone(), pool, &args.projector, token).await?;
    bus.flush_at_exit().await;
    Ok(())
}
