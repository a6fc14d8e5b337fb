//! `event-projector`: keeps entity projections up to date (one active, the others standby).

use clap::Parser;
use event_service::infra::settings::{Common, ProjectorArgs};
use event_service::service;

#[global_allocator]
static ALLOCATOR: event_service::Allocator = event_service::Allocator;

#[derive(Parser)]
#[command(version, about = "The event-service projector stage")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    projector: ProjectorArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = service::start(&args.common, "event-projector").await?;
    service::run_projector(started.bus.clone(), started.pool, &args.projector, started.token).await?;
    started.bus.flush_at_exit().await;
    Ok(())
}
