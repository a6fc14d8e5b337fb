//! The process's memory: transparent huge pages off, unless the operator asks for them.
//!
//! Reads `MIMALLOC_ALLOW_THP`; writes the process's "THP disable" flag (`prctl`).
//! Guarantees: called at start-up, every page the allocator touches from then on is a 4 KiB
//! page. mimalloc asks the kernel for huge pages for its arenas, and a fault on one zeroes
//! 2 MiB at once: in the persisted bench 7 % of the service's samples were the kernel
//! zeroing them, and without them its peak memory is a quarter to a third lower for the
//! same CPU (BENCHMARKS.md, "Huge pages off"). With `MIMALLOC_ALLOW_THP` set, mimalloc's own
//! option decides, as its documentation says. The private nats-server and PostgreSQL of a local run get the
//! system's setting back ([`crate::infra::local`]).

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` is set.
pub fn no_huge_pages() {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return;
    }
    // SAFETY: prctl with PR_SET_THP_DISABLE only sets a flag of the calling process.
    let status = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if status != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "cannot turn transparent huge pages off");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thp_enabled() -> Option<String> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        status.lines().find_map(|line| line.strip_prefix("THP_enabled:")).map(|value| value.trim().to_owned())
    }

    #[test]
    fn the_process_runs_without_transparent_huge_pages() {
        if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() || thp_enabled().is_none() {
            return; // the operator decides, or the kernel does not say
        }
        no_huge_pages();
        assert_eq!(thp_enabled().as_deref(), Some("0"));
    }
}
