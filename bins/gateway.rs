//! `event-gateway`: the HTTP API alone.

use clap::Parser;
use event_service::gateway::Gateway;
use event_service::infra::settings::{Common, GatewayArgs};
use event_service::service;

#[global_allocator]
static ALLOCATOR: event_service::Allocator = event_service::Allocator;

#[derive(Parser)]
#[command(version, about = "The event-service HTTP gateway")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    gateway: GatewayArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = service::start(&args.common, "event-gateway").await?;
    let listener = tokio::net::TcpListener::bind(args.gateway.http_addr).await?;
    let gateway = Gateway::build(started.bus.clone(), started.pool, &args.gateway, started.token.clone()).await?;
    gateway.run(listener, started.token).await?;
    started.bus.flush_at_exit().await;
    Ok(())
}
