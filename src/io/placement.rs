//! Which core runs what: pinned glommio executors, the CPUs this process may use, and one clear
//! line (with the fix) when an io_uring executor cannot start.

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::mpsc;
use std::thread::JoinHandle;

use glommio::{LocalExecutorBuilder, Placement};

use crate::io::driver::{self, IoMode};

/// Memory glommio pre-registers with io_uring for storage DMA buffers. The lab does only socket
/// I/O, so the 10 MiB default would be locked memory spent on nothing; glommio's floor is 64 KiB.
const IO_MEMORY: usize = 256 * 1024;

/// The CPUs this process may run on (its affinity mask, so `taskset` and cgroups are honoured).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask struct owned by this frame; the kernel fills it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            let n = std::thread::available_parallelism().map_or(1, |n| n.get());
            return (0..n).collect();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// Formats a CPU list compactly, e.g. `0-1` or `0,2,5`.
pub fn format_cpus(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end > start {
            out.push_str(&format!("{start}-{end}"));
        } else {
            out.push_str(&start.to_string());
        }
        i += 1;
    }
    out
}

/// Checks that `cpu` is one this process may run on.
pub fn check_cpu(cpu: usize) -> io::Result<()> {
    let allowed = allowed_cpus();
    if allowed.contains(&cpu) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "CPU {cpu} is not available to this process (allowed: {}); pick one of those",
                format_cpus(&allowed)
            ),
        ))
    }
}

/// The default CPU for a role: `index` counted from the end of the allowed list, so on a 2-core
/// machine role 0 is CPU 1 and role 1 is CPU 0. Servers default to the last CPU and clients to
/// the first, keeping the load generator off the cores that serve.
pub fn default_cpu(index_from_end: usize) -> usize {
    let allowed = allowed_cpus();
    let n = allowed.len();
    allowed[n - 1 - (index_from_end % n)]
}

/// A running executor thread and where it runs.
pub struct Executor<T> {
    /// `None` when the executor never started (already reported by [`spawn_pinned`]).
    handle: JoinHandle<Option<T>>,
    /// The CPU it is pinned to, if any.
    pub cpu: Option<usize>,
    /// Its thread name.
    pub name: String,
    /// How its socket driver was set up (see [`crate::io::driver::Driver::describe`]).
    pub driver: String,
}

impl<T> fmt::Debug for Executor<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Executor")
            .field("cpu", &self.cpu)
            .field("name", &self.name)
            .finish()
    }
}

impl<T> Executor<T> {
    /// Waits for the executor's main future to finish and returns its output.
    pub fn join(self) -> io::Result<T> {
        match self.handle.join() {
            Ok(Some(out)) => Ok(out),
            Ok(None) => Err(io::Error::other(format!(
                "executor {} never started",
                self.name
            ))),
            Err(_) => Err(io::Error::other(format!("executor {} panicked", self.name))),
        }
    }
}

/// Starts a glommio executor on a new thread, pinned to `cpu` (or unbound), with its sockets on
/// the `io` driver, and runs `make()`'s future on it. Returns only once the executor and its
/// driver are up, so a failure to create either is an `Err` here, one line with the fix, rather
/// than a panic on another thread.
pub fn spawn_pinned<G, F, T>(
    name: &str,
    cpu: Option<usize>,
    io: IoMode,
    make: G,
) -> io::Result<Executor<T>>
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = T> + 'static,
    T: Send + 'static,
{
    if let Some(cpu) = cpu {
        check_cpu(cpu)?;
    }
    let on = cpu.map(|c| format!(" on CPU {c}")).unwrap_or_default();
    if let Err(err) = driver::check_io_uring() {
        return Err(io::Error::other(executor_failed(&on, &err)));
    }
    enum Failed {
        Executor(String),
        Driver(String),
    }
    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<String, Failed>>(1);
    let thread_name = name.to_string();
    let handle = std::thread::Builder::new()
        .name(thread_name.clone())
        .spawn(move || {
            let placement = match cpu {
                Some(cpu) => Placement::Fixed(cpu),
                None => Placement::Unbound,
            };
            let executor = LocalExecutorBuilder::new(placement)
                .name(&thread_name)
                .io_memory(IO_MEMORY)
                .make();
            let executor = match executor {
                Ok(executor) => executor,
                Err(err) => {
                    let _ = ready_tx.send(Err(Failed::Executor(err.to_string())));
                    return None;
                }
            };
            driver::set_mode(io);
            executor.run(async move {
                match driver::start() {
                    Ok(described) => {
                        let _ = ready_tx.send(Ok(described));
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(Failed::Driver(err.to_string())));
                        return None;
                    }
                }
                let out = driver::tracked(make()).await;
                driver::exit();
                Some(out)
            })
        })?;
    let started = ready_rx
        .recv()
        .unwrap_or_else(|_| Err(Failed::Executor("thread exited".into())));
    let driver = match started {
        Ok(described) => described,
        Err(failed) => {
            let _ = handle.join();
            return Err(io::Error::other(match failed {
                Failed::Executor(err) => executor_failed(&on, &err),
                Failed::Driver(err) => format!(
                    "cannot set up the io_uring for the sockets{on}: {err}. The uring driver \
                     needs Linux 5.11 or newer with io_uring enabled (sysctl \
                     kernel.io_uring_disabled=0); to run anyway, pass --io epoll"
                ),
            }));
        }
    };
    Ok(Executor {
        handle,
        cpu,
        name: name.to_string(),
        driver,
    })
}

/// The one line for an executor that cannot start (`on` names the CPU, or is empty).
fn executor_failed(on: &str, err: &str) -> String {
    format!(
        "cannot start a glommio executor{on}: {err}. glommio runs on io_uring whichever --io \
         driver the sockets use: it needs Linux 5.8 or newer with io_uring enabled (sysctl \
         kernel.io_uring_disabled=0; in a container, a seccomp profile that allows \
         io_uring_setup) and at least 512 KiB of locked memory (`ulimit -l unlimited` or \
         LimitMEMLOCK=infinity)"
    )
}

/// Pins the calling OS thread to `cpu`; threads it creates afterwards inherit the pinning.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    check_cpu(cpu)?;
    // SAFETY: `set` is a plain bitmask owned by this frame; 0 means the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// CPU time (user + system) the calling thread has used so far.
pub fn thread_cpu() -> std::time::Duration {
    cpu_of(libc::RUSAGE_THREAD)
}

/// CPU time (user + system) the whole process has used so far, exited threads included.
pub fn process_cpu() -> std::time::Duration {
    cpu_of(libc::RUSAGE_SELF)
}

fn cpu_of(who: libc::c_int) -> std::time::Duration {
    // SAFETY: `usage` is a plain C struct the kernel fills; RUSAGE_THREAD and RUSAGE_SELF cannot
    // fail for the calling thread (on error the zeroed struct reads as no time).
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(who, &mut usage) };
    let tv = |t: libc::timeval| std::time::Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}
