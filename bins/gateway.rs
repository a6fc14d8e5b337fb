//! `event-gateway`: the HTTP API alone.

use clap::Parser;
use event_service::settings::{self, DatabaseArgs, GatewayArgs, LogArgs, NatsArgs};
use event_service::{gateway::Gateway, service, shutdown, telemetry};

#[derive(Parser)]
#[command(version, about = "The event-service HTTP gateway")]
struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
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
        service::connect_and_set_up(nats_url, &args.nats, database_url, &args.database, "event-gateway").await?;
    let listener = tokio::net::TcpListener::bind(args.gateway.http_addr).await?;
    Gateway::build(bus.clone(), pool, &args.gateway, token.clone()).await?.run(listener, token).await?;
    bus.flush_at_exit().await;
    Ok(())
}
