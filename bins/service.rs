//! `event-service`: every stage in one process. Without `NATS_URL` / `DATABASE_URL` it starts
//! a private nats-server and PostgreSQL under `EVENT_DATA_DIR` (default `.data`), reused by
//! the next run.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use event_service::domain::Secret;
use event_service::domain::secret::shown_url;
use event_service::infra::local::{LocalNats, LocalPostgres};
use event_service::infra::settings::{
    CallbackArgs, Common, DispatcherArgs, GatewayArgs, PersisterArgs, ProcessorArgs, ProjectorArgs,
};
use event_service::infra::{db, memory, ops, shutdown, telemetry};
use event_service::service;

#[global_allocator]
static ALLOCATOR: event_service::Allocator = event_service::Allocator;

#[derive(Parser)]
#[command(version, about = "The whole event pipeline in one process")]
struct Args {
    #[command(flatten)]
    common: Common,
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

/// Where NATS and PostgreSQL are, and the private servers started when none was given (they
/// stop when dropped).
struct Servers {
    nats_url: Secret,
    database_url: Secret,
    local_nats: Option<LocalNats>,
    local_postgres: Option<LocalPostgres>,
}

impl Servers {
    async fn given_or_started(args: &Args, data_dir: &Path) -> anyhow::Result<Self> {
        let (nats_url, local_nats) = match &args.common.nats.nats_url {
            Some(url) => (url.clone(), None),
            None => {
                let local = LocalNats::start(&args.nats_server_bin, &data_dir.join("nats"), 0)?;
                (Secret::new(local.url.as_str()), Some(local))
            }
        };
        let (database_url, local_postgres) = match &args.common.database.database_url {
            Some(url) => (url.clone(), None),
            None => {
                let local = LocalPostgres::start(&data_dir.join("postgres"), 0, true)?;
                db::ensure_database(&local.url("postgres"), "event_service").await?;
                (Secret::new(local.url("event_service")), Some(local))
            }
        };
        Ok(Self { nats_url, database_url, local_nats, local_postgres })
    }

    fn print(&self, http: std::net::SocketAddr, data_dir: &Path) {
        let shown = match http.ip().is_unspecified() {
            true => format!("http://127.0.0.1:{}", http.port()),
            false => format!("http://{http}"),
        };
        let private = |local: bool, what: &str| if local { format!("   (private {what})") } else { String::new() };
        println!("event-service is running");
        println!("  HTTP API     {shown}   (try: curl {shown}/health)");
        println!(
            "  NATS         {}{}",
            shown_url(self.nats_url.expose()),
            private(self.local_nats.is_some(), "nats-server")
        );
        let database = shown_url(self.database_url.expose());
        println!("  PostgreSQL   {database}{}", private(self.local_postgres.is_some(), "cluster"));
        if self.local_nats.is_some() || self.local_postgres.is_some() {
            println!("  data folder  {}", data_dir.display());
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let _telemetry = telemetry::init(&args.common.log.format, "event-service");
    memory::no_huge_pages();
    let token = shutdown::on_signal();
    let data_dir = std::path::absolute(&args.data_dir)?;
    let servers = Servers::given_or_started(&args, &data_dir).await?;
    let (nats, database) = (&args.common.nats, &args.common.database);
    let (bus, pool) =
        service::connect_and_set_up(&servers.nats_url, nats, &servers.database_url, database, "event-service").await?;
    if matches!(args.command, Some(Command::Setup)) {
        println!("JetStream topology and database migrations are up to date");
        return Ok(());
    }
    if let Some(addr) = args.common.metrics_addr {
        ops::start(addr, bus.clone(), pool.clone(), token.clone()).await?;
    }
    let listener = tokio::net::TcpListener::bind(args.gateway.http_addr).await?;
    servers.print(listener.local_addr()?, &data_dir);
    if servers.local_nats.is_some() && args.callbacks.allowed_nets.is_empty() {
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
    drop(servers);
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
