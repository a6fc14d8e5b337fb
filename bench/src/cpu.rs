//! CPU time of the processes the pipeline runs on (the service, PostgreSQL, nats-server), read
//! from `/proc`, so a scenario can say what each event cost in CPU as well as in time. On a
//! shared machine throughput varies from run to run; CPU per event varies much less, which
//! makes it the figure to compare before and after a change.

/// Seconds of CPU used so far, by process name.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTimes {
    pub service: f64,
    pub postgres: f64,
    pub nats: f64,
}

impl CpuTimes {
    /// Reads every process of this machine; processes of other names are left out.
    pub fn now() -> Self {
        let mut times = Self::default();
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let Ok(entries) = std::fs::read_dir("/proc") else { return times };
        for entry in entries.flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // `pid (comm) state ppid ...`: the name may hold spaces, the fields after it do not.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else { continue };
            let name = &stat[open + 1..close];
            let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
            // utime, stime, and the CPU of children that ended (PostgreSQL backends).
            let used: f64 =
                fields.get(11..15).map_or(0.0, |cpu| cpu.iter().filter_map(|f| f.parse::<f64>().ok()).sum());
            let slot = match name {
                "event-service" => &mut times.service,
                "postgres" => &mut times.postgres,
                "nats-server" => &mut times.nats,
                _ => continue,
            };
            *slot += used / ticks;
        }
        times
    }

    /// CPU milliseconds per 1 000 events since `before`, as the results table shows them.
    pub fn per_thousand_since(&self, before: &CpuTimes, events: usize) -> String {
        let per = |now: f64, then: f64| (now - then) * 1000.0 * 1000.0 / events.max(1) as f64;
        format!(
            "service {:.0} ms · PostgreSQL {:.0} ms · nats-server {:.0} ms",
            per(self.service, before.service),
            per(self.postgres, before.postgres),
            per(self.nats, before.nats)
        )
    }
}
