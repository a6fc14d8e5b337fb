//! `event-service`: every stage in one process. Without `NATS_URL` / `DATABASE_URL` it starts
//! a private nats-server and PostgreSQL under `EVENT_DATA_DIR` (default `.data`), reused by
//! the next run.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use event_service::local::{LocalNats, LocalPostgres};
use event_service::settings::{
    CallbackArgs, DatabaseArgs, DispatcherArgs, GatewayArgs, LogArgs, NatsArgs, PersisterArgs, ProcessorArgs,
    ProjectorArgs,
};
use event_service::{service, shutdown, telemetry};

#[derive(Parser)]
#[command(version, about = "The whole event pipeline in one process")]
struct Args {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    #[command(flatten)]
    gateway: GatewayArgs,
    #[command(flatten)]
    persister: PersisterArgs,
    #[command(flatten)]
    processor: ProcessorArgs,
    #[command(flatten)]
    dispatcher: DispatcherArgs,
    #[command(flatten)]
    projector: ProjectorArgs,
    #[command(flatten)]
    callbacks: CallbackArgs,
    #[command(flatten)]
    log: LogArgs,
    /// Where the private servers keep their data when no URLs are given.
    #[arg(long, env = "EVENT_DATA_DIR", default_value = ".data")]
    data_dir: PathBuf,
    /// The nats-server binary for the private server.
    #[arg(long, env = "NATS_SERVER_BIN", default_value = "nats-server")]
    nats_server_bin: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply the JetStream topology (`jetstream/`) and the migrations, then exit.
    Setup,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    telemetry::init(&args.log.format);
    let token = shutdown::on_signal();

    let data_dir = std::path::absolute(&args.data_dir)?;
    let local_nats = match &args.nats.nats_url {
        Some(_) => None,
        None => Some(LocalNats::start(&args.nats_server_bin, &data_dir.join("nats"), 0)?),
    };
    let local_postgres = match &args.database.database_url {
        Some(_) => None,
        None => Some(LocalPostgres::start(&data_dir.join("postgres"), 0, true)?),
    };
    let nats_url = match (&args.nats.nats_url, &local_nats) {
        (Some(url), _) => url.clone(),
        (None, Some(local)) => local.url.clone(),
        (None, None) => unreachable!("a local server was started"),
    };
    let database_url = match (&args.database.database_url, &local_postgres) {
        (Some(url), _) => url.clone(),
        (None, Some(local)) => {
            event_service::db::ensure_database(&local.url("postgres"), "event_service").await?;
            local.url("event_service")
        }
        (None, None) => unreachable!("a local server was started"),
    };
    let (bus, pool) =
        service::connect_and_set_up(&nats_url, &args.nats, &database_url, &args.database, "event-service").await?;
    if matches!(args.command, Some(Command::Setup)) {
        println!("JetStream topology and database migrations are up to date");
        return Ok(());
    }
    let listener = tokio::net::TcpListener::bind(args.gateway.http_addr).await?;
    let http = listener.local_addr()?;
    let shown =
        if http.ip().is_unspecified() { format!("http://127.0.0.1:{}", http.port()) } else { format!("http://{http}") };
    println!("event-service is running");
    println!("  HTTP API     {shown}   (try: curl {shown}/health)");
    println!("  NATS         {nats_url}{}", if local_nats.is_some() { "   (private nats-server)" } else { "" });
    println!("  PostgreSQL   {database_url}{}", if local_postgres.is_some() { "   (private cluster)" } else { "" });
    if local_nats.is_some() || local_postgres.is_some() {
        println!("  data folder  {}", data_dir.display());
    }
    if local_nats.is_some() && args.callbacks.allowed_nets.is_empty() {
        // The local run: webhooks to services on this machine are the point.
        args.callbacks.allowed_nets = vec!["127.0.0.0/8".parse()?, "::1/128".parse()?];
        println!("  callbacks    may reach loopback (local run; set EVENT_CALLBACK_ALLOWED_NETS to change)");
    }
    println!("Ctrl-C stops everything.");
    let stages = service::AllStages {
        gateway: &args.gateway,
        persister: &args.persister,
        processor: &args.processor,
        dispatcher: &args.dispatcher,
        projector: &args.projector,
        callbacks: &args.callbacks,
    };
    service::run_all(bus, pool, listener, stages, token).await?;
    drop(local_postgres);
    drop(local_nats);
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn settings_parse_without_clashes() {
        super::Args::command().debug_assert();
    }
}
