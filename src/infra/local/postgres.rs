//! A private PostgreSQL cluster: `initdb` once, then `postgres` on a free loopback port, as an
//! unprivileged user when we are root.
//!
//! Writes only under its folder. Guarantees: the server dies with the process that started it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{die_with_parent, free_port, signal, wait_timeout};

/// A PostgreSQL cluster in a folder of its own.
pub struct LocalPostgres {
    child: Option<Child>,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    socket_dir: PathBuf,
    log_path: PathBuf,
    owner: Option<(u32, u32)>,
    pub port: u16,
    durable: bool,
}

impl LocalPostgres {
    /// Initializes (first time only) and starts a cluster under `dir` on `port` (0: a free
    /// one). `durable = false` turns off fsync for tests.
    pub fn start(dir: &Path, port: u16, durable: bool) -> anyhow::Result<Self> {
        let bin_dir = postgres_bin_dir()?;
        let owner = unprivileged_owner()?;
        fs::create_dir_all(dir)?;
        open_up(dir)?;
        let data_dir = dir.join("data");
        let socket_dir = dir.join("socket");
        fs::create_dir_all(&socket_dir)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid))?;
        }
        if !data_dir.join("PG_VERSION").exists() {
            fs::create_dir_all(&data_dir)?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&data_dir, Some(uid), Some(gid))?;
            }
            let mut initdb = Command::new(bin_dir.join("initdb"));
            initdb
                .arg("-D")
                .arg(&data_dir)
                .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            if !durable {
                initdb.arg("--no-sync");
            }
            as_owner(&mut initdb, owner);
            let output = initdb.output().context("cannot run initdb")?;
            if !output.status.success() {
                bail!("initdb failed: {}", String::from_utf8_lossy(&output.stderr));
            }
        }
        let mut server = Self {
            child: None,
            bin_dir,
            data_dir,
            socket_dir,
            log_path: dir.join("postgres.log"),
            owner,
            port,
            durable,
        };
        server.launch()?;
        Ok(server)
    }

    /// Starts the server process (again, after [`stop`](Self::stop)) on the same port.
    pub fn launch(&mut self) -> anyhow::Result<()> {
        for _attempt in 0..5 {
            let port = if self.port == 0 { free_port()? } else { self.port };
            let log = fs::OpenOptions::new().create(true).append(true).open(&self.log_path)?;
            let mut command = Command::new(self.bin_dir.join("postgres"));
            command
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-p")
                .arg(port.to_string())
                .arg("-k")
                .arg(&self.socket_dir)
                .args(["-c", "listen_addresses=127.0.0.1", "-c", "max_connections=300"])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            if !self.durable {
                command.args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]);
            }
            as_owner(&mut command, self.owner);
            die_with_parent(&mut command);
            let mut child = command.spawn().context("cannot start postgres")?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(status) = child.try_wait()? {
                    tracing::warn!(%status, port, "postgres exited at start; trying another port");
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && self.accepts_queries(port) {
                    self.port = port;
                    self.child = Some(child);
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    bail!("postgres did not start in time; see {}", self.log_path.display());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.port != 0 {
                bail!("postgres could not start on port {}; see {}", self.port, self.log_path.display());
            }
        }
        bail!("postgres could not find a free port")
    }

    fn accepts_queries(&self, port: u16) -> bool {
        Command::new(self.bin_dir.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-q"])
            .status()
            .map(|status| status.success())
            .unwrap_or(false)
    }

    /// `postgres://postgres@127.0.0.1:{port}/{database}`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Fast shutdown: disconnects clients, checkpoints, exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), libc::SIGINT);
            if wait_timeout(&mut child, Duration::from_secs(30)).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

impl Drop for LocalPostgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds PostgreSQL's server binaries: `PG_BIN_DIR`, else the newest under
/// /usr/lib/postgresql, else `pg_config --bindir`.
pub fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("PG_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_string_lossy().parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let output = Command::new("pg_config").arg("--bindir").output().context("PostgreSQL is not installed")?;
    Ok(PathBuf::from(String::from_utf8_lossy(&output.stdout).trim()))
}

/// The user PostgreSQL runs as: ourselves, or (as root) `postgres`, created if missing.
fn unprivileged_owner() -> anyhow::Result<Option<(u32, u32)>> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Ok(None);
    }
    let lookup = || -> Option<(u32, u32)> {
        let uid = Command::new("id").args(["-u", "postgres"]).output().ok()?;
        let gid = Command::new("id").args(["-g", "postgres"]).output().ok()?;
        let parse = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().parse().ok();
        Some((parse(&uid.stdout)?, parse(&gid.stdout)?))
    };
    if let Some(ids) = lookup() {
        return Ok(Some(ids));
    }
    let status = Command::new("useradd")
        .args(["--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "postgres"])
        .status()
        .context("cannot create the postgres user")?;
    if !status.success() {
        bail!("useradd postgres failed");
    }
    lookup().map(Some).context("the postgres user is missing after useradd")
}

/// The cluster's user must be able to reach its folder.
fn open_up(dir: &Path) -> anyhow::Result<()> {
    let mut current = Some(dir);
    while let Some(path) = current {
        if path == Path::new("/") {
            break;
        }
        let mode = fs::metadata(path)?.permissions().mode();
        if mode & 0o011 != 0o011 {
            fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o711))?;
        }
        current = path.parent();
    }
    Ok(())
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
    }
}
