//! Private nats-servers with JetStream: one alone (the local run, the tests) or three in a
//! cluster ([`NatsCluster`], for `event-cluster`).
//!
//! Writes only under the folders it is given. Guarantees: a server is returned only once
//! JetStream answers; it dies with the process that started it.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{die_with_parent, http_get_ok, signal, wait_timeout};

/// A running nats-server.
pub struct LocalNats {
    child: Child,
    pub url: String,
    pub monitor_url: String,
    store_dir: PathBuf,
}

impl LocalNats {
    /// Starts `nats-server -js` storing under `dir`, on `port` (0: any free port), and waits
    /// until JetStream is ready.
    pub fn start(binary: &Path, dir: &Path, port: u16) -> anyhow::Result<Self> {
        Self::start_with(binary, dir, port, &[])
    }

    /// [`LocalNats::start`] with more arguments for nats-server.
    fn start_with(binary: &Path, dir: &Path, port: u16, extra: &[String]) -> anyhow::Result<Self> {
        let store_dir = dir.join("jetstream");
        let ports_dir = dir.join("ports");
        fs::create_dir_all(&store_dir)?;
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir)?;
        let log = File::create(dir.join("nats-server.log"))?;
        let port_arg = if port == 0 { "-1".to_owned() } else { port.to_string() };
        let mut command = Command::new(binary);
        command
            .args(["-js", "-a", "127.0.0.1", "-p", &port_arg, "-m", "-1", "-sd"])
            .arg(&store_dir)
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut command);
        let child =
            command.spawn().with_context(|| format!("cannot start {} (set NATS_SERVER_BIN)", binary.display()))?;
        let mut server = Self { child, url: String::new(), monitor_url: String::new(), store_dir };
        let ports = server.wait_for_ports(&ports_dir)?;
        server.url = ports.client;
        server.monitor_url = ports.monitoring;
        server.wait_until_ready()?;
        Ok(server)
    }

    fn wait_for_ports(&mut self, ports_dir: &Path) -> anyhow::Result<Ports> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("nats-server exited with {status}; see its log beside {}", self.store_dir.display());
            }
            let file = fs::read_dir(ports_dir)?
                .flatten()
                .find(|entry| entry.file_name().to_string_lossy().ends_with(".ports"));
            if let Some(file) = file {
                let text = fs::read_to_string(file.path())?;
                if let Ok(ports) = serde_json::from_str::<PortsFile>(&text)
                    && let (Some(client), Some(monitoring)) =
                        (ports.nats.into_iter().next(), ports.monitoring.into_iter().next())
                {
                    return Ok(Ports { client, monitoring });
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("nats-server did not report its ports in time")
    }

    fn wait_until_ready(&self) -> anyhow::Result<()> {
        let address = self.monitor_url.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get_ok(&address, "/healthz?js-enabled-only=true") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("nats-server JetStream did not become ready")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|port| port.parse().ok()).unwrap_or(0)
    }

    /// Stops the server and waits for it.
    pub fn stop(&mut self) {
        signal(self.child.id(), libc::SIGTERM);
        if wait_timeout(&mut self.child, Duration::from_secs(10)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for LocalNats {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Ports {
    client: String,
    monitoring: String,
}

#[derive(serde::Deserialize)]
struct PortsFile {
    #[serde(default)]
    nats: Vec<String>,
    #[serde(default)]
    monitoring: Vec<String>,
}

/// Three (or more) nats-servers in one cluster, JetStream on each: streams with three
/// replicas survive the loss of any one of them.
pub struct NatsCluster {
    pub servers: Vec<LocalNats>,
    binary: PathBuf,
    /// Each server's folder and extra arguments, to start it again.
    recipes: Vec<(PathBuf, Vec<String>)>,
}

impl NatsCluster {
    /// Starts `size` servers under `dir/nats-{n}`, routed to each other, and waits until
    /// JetStream has a meta leader.
    pub fn start(binary: &Path, dir: &Path, size: usize) -> anyhow::Result<Self> {
        let route_ports = (0..size).map(|_| super::free_port()).collect::<anyhow::Result<Vec<_>>>()?;
        let routes: Vec<String> = route_ports.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect();
        let mut servers = Vec::with_capacity(size);
        let mut recipes = Vec::with_capacity(size);
        for (index, port) in route_ports.iter().enumerate() {
            let name = format!("nats-{}", index + 1);
            let extra = [
                "--name".to_owned(),
                name.clone(),
                "--cluster_name".to_owned(),
                "event-cluster".to_owned(),
                "--cluster".to_owned(),
                format!("nats://127.0.0.1:{port}"),
                "--routes".to_owned(),
                routes.join(","),
            ];
            servers.push(LocalNats::start_with(binary, &dir.join(&name), 0, &extra)?);
            recipes.push((dir.join(&name), extra.to_vec()));
        }
        let cluster = Self { servers, binary: binary.to_owned(), recipes };
        cluster.wait_for_meta_leader()?;
        Ok(cluster)
    }

    /// Every server's client URL, comma-separated (the `NATS_URL` of a cluster), starting
    /// with server `first` so that clients spread over the seeds.
    pub fn url_from(&self, first: usize) -> String {
        let count = self.servers.len();
        (0..count).map(|offset| self.servers[(first + offset) % count].url.as_str()).collect::<Vec<_>>().join(",")
    }

    /// Starts server `index` again (after a kill or stop) on its old client port, with its
    /// data, and waits until it answers.
    pub fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        let (dir, extra) = &self.recipes[index];
        let port = self.servers[index].port();
        self.servers[index] = LocalNats::start_with(&self.binary, dir, port, extra)?;
        Ok(())
    }

    fn wait_for_meta_leader(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let healthy = self
                .servers
                .iter()
                .all(|server| http_get_ok(server.monitor_url.trim_start_matches("http://"), "/healthz"));
            if healthy {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("the NATS cluster did not elect a JetStream meta leader in time")
    }
}
