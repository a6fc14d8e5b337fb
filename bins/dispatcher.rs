//! `event-dispatcher`: queues subscription deliveries (EVENTS → DELIVERIES) and sends them.

use clap::Parser;
use event_service::infra::settings::{CallbackArgs, Common, DispatcherArgs};
use event_service::service;

#[global_allocator]
static ALLOCATOR: event_service::Allocator = event_service::Allocator;

#[derive(Parser)]
#[command(version, about = "The event-service dispatcher and sender (subscription webhooks)")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    dispatcher: DispatcherArgs,
    #[command(flatten)]
    callbacks: CallbackArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = service::start(&args.common, "event-dispatcher").await?;
    let (bus, pool, token) = (started.bus.clone(), started.pool, started.token);
    service::run_dispatching(bus, pool, &args.dispatcher, &args.callbacks, token).await?;
    started.bus.flush_at_exit().await;
    Ok(())
}
