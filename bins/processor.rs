//! `event-processor`: runs the registered processors on EVENTS, and replay jobs.

use clap::Parser;
use event_service::infra::settings::{CallbackArgs, Common, ProcessorArgs};
use event_service::service;

#[global_allocator]
static ALLOCATOR: event_service::Allocator = event_service::Allocator;

#[derive(Parser)]
#[command(version, about = "The event-service processor stage (processors and replays)")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    processor: ProcessorArgs,
    #[command(flatten)]
    callbacks: CallbackArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = service::start(&args.common, "event-processor").await?;
    let (bus, pool, token) = (started.bus.clone(), started.pool, started.token);
    service::run_processing(bus, pool, &args.processor, &args.callbacks, token).await?;
    started.bus.flush_at_exit().await;
    Ok(())
}
