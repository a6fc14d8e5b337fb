//! `event-persister`: stores EVENTS in PostgreSQL.

use clap::Parser;
use event_service::infra::settings::{Common, PersisterArgs};
use event_service::service;
use event_service::stages::persister::Persister;

#[global_allocator]
static ALLOCATOR: event_service::Allocator = event_service::Allocator;

#[derive(Parser)]
#[command(version, about = "The event-service persister stage")]
struct Args {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    persister: PersisterArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let started = service::start(&args.common, "event-persister").await?;
    Persister::build(started.bus.clone(), started.pool, &args.persister).await?.run(started.token).await?;
    started.bus.flush_at_exit().await;
    Ok(())
}
