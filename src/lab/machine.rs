//! Facts about the machine and build that every committed result records: CPU model, cores,
//! kernel, ringlab version, git revision, the time and the command line.

use serde::{Deserialize, Serialize};

/// ringlab's git revision (`git describe --always --dirty`), embedded by `build.rs`; it says so
/// when the binary was built outside a git checkout.
pub const GIT_REVISION: &str = env!("RINGLAB_GIT_REVISION");

/// `ringlab --version`: the crate version and the git revision it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (git ",
    env!("RINGLAB_GIT_REVISION"),
    ")"
);

/// Where and with what a measurement was made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model name from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// CPUs online.
    pub cpus_online: usize,
    /// CPUs this process may use (its affinity).
    pub cpus_allowed: String,
    /// Kernel release and machine (`uname -r -m`).
    pub kernel: String,
    /// Host name.
    pub hostname: String,
    /// ringlab's crate version.
    pub ringlab_version: String,
    /// `git describe --always --dirty` of ringlab's own source, taken when it was built.
    pub git_revision: String,
    /// UTC time the measurement started, RFC 3339.
    pub started_utc: String,
    /// The command line.
    pub command: String,
}

impl Machine {
    /// Reads the facts now.
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        // SAFETY: sysconf with a valid name has no memory effects.
        let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
        let (kernel, hostname) = uname();
        Machine {
            cpu_model,
            cpus_online: online,
            cpus_allowed: crate::io::placement::format_cpus(&crate::io::placement::allowed_cpus()),
            kernel,
            hostname,
            ringlab_version: env!("CARGO_PKG_VERSION").to_string(),
            git_revision: GIT_REVISION.to_string(),
            started_utc: utc_now_rfc3339(),
            command: std::env::args().collect::<Vec<_>>().join(" "),
        }
    }
}

impl Machine {
    /// The facts, one per line (`ringlab machine`).
    pub fn describe(&self) -> String {
        format!(
            "CPU: {}\nCPUs online: {} (this process may use {})\nKernel: {}\nHost: {}\nringlab: {} (git {})\n",
            self.cpu_model,
            self.cpus_online,
            self.cpus_allowed,
            self.kernel,
            self.hostname,
            self.ringlab_version,
            self.git_revision
        )
    }
}

fn uname() -> (String, String) {
    // SAFETY: `uts` is a plain struct the kernel fills; the strings are NUL-terminated.
    unsafe {
        let mut uts: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut uts) != 0 {
            return ("unknown".into(), "unknown".into());
        }
        let s = |f: &[libc::c_char]| {
            std::ffi::CStr::from_ptr(f.as_ptr())
                .to_string_lossy()
                .into_owned()
        };
        (
            format!(
                "{} {} {}",
                s(&uts.sysname),
                s(&uts.release),
                s(&uts.machine)
            ),
            s(&uts.nodename),
        )
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now_rfc3339() -> String {
    let (date, time) = utc_now_parts();
    format!("{date}T{time}Z")
}

/// The current UTC time as `YYYYMMDD-HHMMSS`, for folder names that sort by time.
pub fn utc_now_compact() -> String {
    let (date, time) = utc_now_parts();
    format!("{}-{}", date.replace('-', ""), time.replace(':', ""))
}

fn utc_now_parts() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (year, month, day) = crate::serve::http::civil_from_days((secs / 86_400) as i64);
    let t = secs % 86_400;
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60),
    )
}
