//! A child process of ours (a stage of `event-cluster`): its output in a log file, stopped
//! gracefully (SIGTERM, then SIGKILL after a grace period), dead with us in any case.
//!
//! Writes its log file. Guarantees: the child gets SIGQUIT when we die, even by SIGKILL.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;

use super::{die_with_parent, signal, wait_timeout};

/// A running child process.
pub struct LocalProcess {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl LocalProcess {
    /// Starts `command` with its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut command: Command, log: &Path) -> anyhow::Result<Self> {
        let file = File::options().create(true).append(true).open(log)?;
        command.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file);
        die_with_parent(&mut command);
        let child = command.spawn().with_context(|| format!("cannot start {name}"))?;
        Ok(Self { name: name.to_owned(), log: log.to_owned(), child })
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGKILL: a crash, nothing finished.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (it finishes the work in hand), then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if !self.running() {
            return;
        }
        signal(self.child.id(), libc::SIGTERM);
        if wait_timeout(&mut self.child, grace).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for LocalProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}
