//! Process limits that decide safe defaults: the descriptor limit, raised to its hard ceiling at
//! start-up, and the connection caps derived from it.

/// Raises the soft open-files limit to the hard limit (as nginx's `worker_rlimit_nofile` and
/// HAProxy do), so a server's cap is set by the system, not by a shell's default of 1024.
/// Returns the resulting soft limit.
pub fn raise_nofile() -> u64 {
    // SAFETY: get/setrlimit on a stack-owned struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        if rl.rlim_cur < rl.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: rl.rlim_max,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return rl.rlim_max;
            }
        }
        rl.rlim_cur
    }
}

/// The current soft open-files limit.
pub fn nofile() -> u64 {
    // SAFETY: getrlimit on a stack-owned struct.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        rl.rlim_cur
    }
}

/// A default cap on concurrent connections per executor that keeps `fds_per_conn` descriptors
/// each inside the descriptor limit, leaving room for listeners and the runtime, at most 10 000.
pub fn default_max_conns(fds_per_conn: u64) -> usize {
    let usable = nofile().saturating_sub(128);
    (usable / fds_per_conn.max(1)).clamp(64, 10_000) as usize
}
