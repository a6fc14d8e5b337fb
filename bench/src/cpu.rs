//! CPU time of the processes the pipeline runs on (the service, PostgreSQL, nats-server), read
//! from `/proc`, so a scenario can say what each event cost in CPU as well as in time. On a
//! shared machine throughput varies from run to run; CPU per event varies much less, which
//! makes it the figure to compare before and after a change.
//!
//! Reads `/proc/*/stat`; writes nothing. Guarantees: what a process used is counted per
//! process (pid and start time), so a process that ends between two readings never makes a
//! figure negative. Its CPU moves into its parent's count of ended children when the parent is
//! counted too (PostgreSQL's backends); otherwise the CPU it used since the first reading is
//! not counted. Every process of these names on the machine is counted: run the bench alone.

use std::collections::HashMap;

/// The processes counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Service,
    Postgres,
    Nats,
}

impl Kind {
    fn of(name: &str) -> Option<Self> {
        match name {
            "event-service" => Some(Self::Service),
            "postgres" => Some(Self::Postgres),
            "nats-server" => Some(Self::Nats),
            _ => None,
        }
    }
}

/// One process as `/proc/{pid}/stat` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcStat {
    pub name: String,
    pub parent: u32,
    /// When it started, in clock ticks after boot: with the pid, names one process.
    pub start: u64,
    /// Seconds of CPU it used itself (user + system).
    pub own: f64,
    /// Seconds of CPU of its children that ended and were waited for.
    pub children: f64,
}

/// Parses the text of `/proc/{pid}/stat`: `pid (comm) state ppid ...`, where the name may
/// hold spaces and the fields after it do not.
fn parse_stat(text: &str, ticks: f64) -> Option<ProcStat> {
    let (open, close) = (text.find('(')?, text.rfind(')')?);
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let number = |index: usize| fields.get(index).and_then(|field| field.parse::<f64>().ok());
    Some(ProcStat {
        name: text.get(open + 1..close)?.to_owned(),
        parent: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
        own: (number(11)? + number(12)?) / ticks,
        children: (number(13)? + number(14)?) / ticks,
    })
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as f64
}

/// One process now; `None` when it has ended.
pub fn process(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?, clock_ticks())
}

/// Seconds of CPU one process used between two readings of it; `None` when it ended (or its
/// pid went to another process) in between, so its figure is unknown rather than wrong.
pub fn process_used(before: Option<&ProcStat>, after: Option<&ProcStat>) -> Option<f64> {
    match (before, after) {
        (Some(before), Some(after)) if before.start == after.start => Some(after.own - before.own),
        _ => None,
    }
}

/// Seconds of CPU used, by kind of process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Used {
    pub service: f64,
    pub postgres: f64,
    pub nats: f64,
}

impl Used {
    fn add(&mut self, kind: Kind, seconds: f64) {
        match kind {
            Kind::Service => self.service += seconds,
            Kind::Postgres => self.postgres += seconds,
            Kind::Nats => self.nats += seconds,
        }
    }
}

/// A process counted in a reading.
#[derive(Debug, Clone, Copy)]
struct Counted {
    kind: Kind,
    parent: u32,
    /// Its own CPU and its ended children's, in seconds.
    seconds: f64,
}

/// A reading of every counted process, by (pid, start time).
#[derive(Debug, Clone, Default)]
pub struct CpuTimes {
    processes: HashMap<(u32, u64), Counted>,
}

impl CpuTimes {
    /// Reads every process of this machine; processes of other names are left out.
    pub fn now() -> Self {
        let mut times = Self::default();
        let ticks = clock_ticks();
        let Ok(entries) = std::fs::read_dir("/proc") else { return times };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
            let Ok(text) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            let Some(stat) = parse_stat(&text, ticks) else { continue };
            times.insert(pid, &stat);
        }
        times
    }

    fn insert(&mut self, pid: u32, stat: &ProcStat) {
        if let Some(kind) = Kind::of(&stat.name) {
            let counted = Counted { kind, parent: stat.parent, seconds: stat.own + stat.children };
            self.processes.insert((pid, stat.start), counted);
        }
    }

    /// CPU used since `before`, process by process. A process that started since counts
    /// whole; one that ended counts against its total only when its parent, counted too, took
    /// its CPU into its own count of children.
    pub fn used_since(&self, before: &CpuTimes) -> Used {
        let mut used = Used::default();
        for (key, now) in &self.processes {
            let then = before.processes.get(key).map_or(0.0, |then| then.seconds);
            used.add(now.kind, now.seconds - then);
        }
        for (key, then) in &before.processes {
            // The parent counted in both readings (pid and start time): its children count
            // holds what the ended process used, before the first reading too.
            let parent_took_it = before.processes.iter().any(|(parent_key, parent)| {
                parent_key.0 == then.parent && parent.kind == then.kind && self.processes.contains_key(parent_key)
            });
            if !self.processes.contains_key(key) && parent_took_it {
                used.add(then.kind, -then.seconds);
            }
        }
        used
    }

    /// CPU milliseconds per 1 000 events since `before`, as the results table shows them.
    pub fn per_thousand_since(&self, before: &CpuTimes, events: usize) -> String {
        let used = self.used_since(before);
        let per = |seconds: f64| seconds * 1000.0 * 1000.0 / events.max(1) as f64;
        format!(
            "service {:.0} ms · PostgreSQL {:.0} ms · nats-server {:.0} ms",
            per(used.service),
            per(used.postgres),
            per(used.nats)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(name: &str, parent: u32, start: u64, own: f64, children: f64) -> ProcStat {
        ProcStat { name: name.to_owned(), parent, start, own, children }
    }

    fn reading(processes: &[(u32, ProcStat)]) -> CpuTimes {
        let mut times = CpuTimes::default();
        for (pid, stat) in processes {
            times.insert(*pid, stat);
        }
        times
    }

    #[test]
    fn stat_lines_parse_with_spaces_in_the_name() {
        let text = "4242 (event service) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 9 0 123456 1000 10";
        let parsed = parse_stat(text, 100.0).unwrap();
        assert_eq!(parsed, stat("event service", 1, 123456, 3.0, 0.1));
        assert_eq!(parse_stat("4242 (truncated) S 1", 100.0), None);
    }

    #[test]
    fn a_process_that_ends_never_makes_a_figure_negative() {
        let before =
            reading(&[(10, stat("event-service", 1, 5, 40.0, 0.0)), (11, stat("nats-server", 1, 5, 2.0, 0.0))]);
        // Service 10 ended (its parent, the shell, is not counted); another one started.
        let after = reading(&[(12, stat("event-service", 1, 9, 1.5, 0.0)), (11, stat("nats-server", 1, 5, 3.0, 0.0))]);
        let used = after.used_since(&before);
        assert_eq!((used.service, used.nats), (1.5, 1.0));
    }

    #[test]
    fn an_ended_backend_moves_into_its_postmasters_count() {
        let before = reading(&[(20, stat("postgres", 1, 5, 1.0, 0.0)), (21, stat("postgres", 20, 6, 4.0, 0.0))]);
        // The backend used 0.5 s more, then ended: the postmaster's children count took 4.5 s.
        let after = reading(&[(20, stat("postgres", 1, 5, 1.2, 4.5))]);
        let used = after.used_since(&before);
        assert!((used.postgres - 0.7).abs() < 1e-9, "{used:?}");
    }

    #[test]
    fn a_backend_whose_postmaster_restarted_under_the_same_pid_is_not_subtracted() {
        let before = reading(&[(20, stat("postgres", 1, 5, 1.0, 0.0)), (21, stat("postgres", 20, 6, 4.0, 0.0))]);
        let after = reading(&[(20, stat("postgres", 1, 90, 0.3, 0.0))]);
        assert!((after.used_since(&before).postgres - 0.3).abs() < 1e-9);
    }

    #[test]
    fn one_process_is_compared_with_itself_only() {
        let (then, now) = (stat("event-service", 1, 5, 2.0, 0.0), stat("event-service", 1, 5, 2.5, 0.0));
        assert_eq!(process_used(Some(&then), Some(&now)), Some(0.5));
        assert_eq!(process_used(Some(&then), None), None, "ended");
        assert_eq!(process_used(Some(&then), Some(&stat("event-service", 1, 9, 0.1, 0.0))), None, "pid reused");
    }

    #[test]
    fn a_reused_pid_is_another_process() {
        let before = reading(&[(30, stat("event-service", 1, 5, 9.0, 0.0))]);
        let after = reading(&[(30, stat("event-service", 1, 77, 0.5, 0.0))]);
        assert_eq!(after.used_since(&before).service, 0.5);
    }
}
