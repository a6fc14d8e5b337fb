//! Private servers and processes for the one-command local run, `event-cluster` and the
//! integration tests: `nats-server`s with JetStream ([`nats`]), a PostgreSQL cluster
//! ([`postgres`]), and child processes that die with us ([`LocalProcess`]), each in a folder
//! of its own, on free loopback ports.
//!
//! Writes only under the folders it is given. Guarantees: every child dies with the process
//! that started it (parent-death signal), even when that one is killed; PostgreSQL runs as an
//! unprivileged user when we are root, because `initdb` refuses root.

mod nats;
mod postgres;
mod process;

pub use nats::{LocalNats, NatsCluster};
pub use postgres::{LocalPostgres, postgres_bin_dir};
pub use process::LocalProcess;

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// The child gets SIGQUIT when the thread that started it dies. The uid change happens
/// before this runs, since a credential change clears the setting. It also gets the
/// system's transparent huge pages back, which [`crate::infra::memory`] turned off for us.
pub(crate) fn die_with_parent(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe and touches only the calling (child) process.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_THP_DISABLE, 0, 0, 0, 0);
            Ok(())
        });
    }
}

pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: sending a signal to a child we own.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A port that was free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) fn http_get_ok(address: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(address) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200")
}
