//! A service started by the bench: a private nats-server, a durable PostgreSQL and the
//! release `event-service` binary beside this one, in a fresh folder. Reads `/proc` for the
//! service's memory. Everything is stopped (and the folder removed) at the end.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use event_service::infra::local::{LocalNats, LocalPostgres, free_port};

use crate::Args;

pub struct Service {
    pub url: String,
    pub nats_url: String,
    pub database_url: String,
    child: Child,
    dir: PathBuf,
    nats: LocalNats,
    postgres: LocalPostgres,
}

impl Service {
    pub async fn start(args: &Args) -> anyhow::Result<Self> {
        let dir = match &args.data_dir {
            Some(dir) => std::path::absolute(dir)?,
            None => std::env::temp_dir().join(format!("event-bench-{}", uuid::Uuid::now_v7().simple())),
        };
        std::fs::create_dir_all(&dir)?;
        println!("starting nats-server, PostgreSQL and event-service under {}", dir.display());
        let nats = LocalNats::start(&args.nats_server_bin, &dir.join("nats"), 0)?;
        let postgres = LocalPostgres::start(&dir.join("postgres"), 0, true)?;
        event_service::infra::db::ensure_database(&postgres.url("postgres"), "event_service").await?;
        let database_url = postgres.url("event_service");
        let binary = std::env::current_exe()?.parent().context("the bench binary has no folder")?.join("event-service");
        if !binary.exists() {
            bail!("{} is missing: build it with cargo build --release --bin event-service", binary.display());
        }
        let address = format!("127.0.0.1:{}", free_port()?);
        let log = std::fs::File::create(dir.join("event-service.log"))?;
        let child = Command::new(&binary)
            .env("NATS_URL", &nats.url)
            .env("DATABASE_URL", &database_url)
            .env("EVENT_HTTP_ADDR", &address)
            // The fan-out receiver runs inside the bench, on loopback.
            .env("EVENT_CALLBACK_ALLOWED_NETS", "127.0.0.0/8")
            .env("EVENT_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut service = Self {
            url: format!("http://{address}"),
            nats_url: nats.url.clone(),
            database_url,
            child,
            dir,
            nats,
            postgres,
        };
        service.wait_until_healthy().await?;
        Ok(service)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn wait_until_healthy(&mut self) -> anyhow::Result<()> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("event-service exited with {status}; see {}", self.dir.join("event-service.log").display());
            }
            if let Ok(response) = http.get(format!("{}/health", self.url)).send().await
                && let Ok(body) = response.json::<serde_json::Value>().await
                && body["status"] == "healthy"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("event-service was not healthy within 60 s; see {}", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (graceful), then the servers; the folder goes unless `keep`.
    pub fn stop(mut self, keep: bool) {
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.nats.stop();
        self.postgres.stop();
        if keep {
            println!("data kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub struct Memory {
    pub peak_mib: f64,
    pub now_mib: f64,
}

/// Peak (VmHWM) and current (VmRSS) resident memory of a process, from `/proc`.
pub fn memory(pid: u32) -> Option<Memory> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = status.lines().find(|line| line.starts_with(name))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Some(Memory { peak_mib: field("VmHWM:")?, now_mib: field("VmRSS:")? })
}
