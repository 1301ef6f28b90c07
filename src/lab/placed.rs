//! The lab as separate processes on hosts (`sweep --place`, `sweep --netns`): the backends, the
//! direct and threaded servers, the balancers and the clients each started with their host's
//! command prefix, watched until they listen, stopped by closing their standard input (so nothing
//! outlives the sweep, however it ends), and their stop reports kept with the results. Clients
//! on several hosts run their shares of a cell together, from a start time handed out here, and
//! their histograms are merged exactly.

use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::io::driver::IoMode;
use crate::io::placement::format_cpus;
use crate::io::shutdown::Shutdown;
use crate::lab::client::{BenchResult, ClientShare};
use crate::lab::hgrm;
use crate::lab::hosts::{Host, Role};
use crate::lab::machine::Machine;
use crate::lab::merge;
use crate::lab::pacer::Arrival;
use crate::lab::topology::{LabSetup, NamedTarget, Placement, Ports};
use crate::serve::balancer::Mode;

/// Which host runs which role.
#[derive(Debug, Clone, Serialize)]
pub struct HostPlan {
    /// The backends' hosts (the four backends spread over them in turn; the direct and threaded
    /// servers on the first).
    pub backends: Vec<Host>,
    /// The balancers' host.
    pub lb: Host,
    /// The clients' hosts: each runs its share of every cell.
    pub clients: Vec<Host>,
    /// The ringlab binary on ssh hosts.
    pub remote_bin: String,
    /// How the hosts came to be, for the results (`network namespaces built by this sweep`).
    pub origin: Option<String>,
}

impl HostPlan {
    /// Every role on this machine (what a sweep without `--place` would start in-process).
    pub fn local() -> HostPlan {
        HostPlan {
            backends: vec![Host::local()],
            lb: Host::local(),
            clients: vec![Host::local()],
            remote_bin: "ringlab".into(),
            origin: None,
        }
    }

    /// Places `role` on `hosts`.
    pub fn place(&mut self, role: Role, hosts: Vec<Host>) {
        match role {
            Role::Backends => self.backends = hosts,
            Role::Lb => self.lb = hosts.into_iter().next().unwrap_or_else(Host::local),
            Role::Client => self.clients = hosts,
        }
    }

    /// Every distinct host with the roles it runs, in the order backends, lb, clients.
    pub fn hosts(&self) -> Vec<(Host, Vec<Role>)> {
        let mut all: Vec<(Host, Vec<Role>)> = Vec::new();
        let placed = self
            .backends
            .iter()
            .map(|h| (h, Role::Backends))
            .chain([(&self.lb, Role::Lb)])
            .chain(self.clients.iter().map(|h| (h, Role::Client)));
        for (host, role) in placed {
            match all.iter_mut().find(|(h, _)| h == host) {
                Some((_, roles)) if !roles.contains(&role) => roles.push(role),
                Some(_) => {}
                None => all.push((host.clone(), vec![role])),
            }
        }
        all
    }
}

/// A host's facts as its own `ringlab machine` reported them.
#[derive(Debug, Clone, Serialize)]
pub struct HostFacts {
    /// The host as placed.
    pub host: String,
    /// The roles it ran.
    pub roles: Vec<Role>,
    /// The address the other roles reached it at.
    pub address: IpAddr,
    /// Its CPU, kernel, ringlab version and revision.
    pub machine: Machine,
}

/// What a role printed from start to stop (its counters come last), and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct RoleReport {
    /// `backends`, `lb`, `lb-http`, `direct`, `threaded`.
    pub name: String,
    /// The host it ran on.
    pub host: String,
    /// The command that started it.
    pub command: String,
    /// How it ended (`exit status: 0`), or that it was killed after the grace period.
    pub ended: String,
    /// Its standard output and error, in arrival order.
    pub output: String,
}

/// A role started on its host.
struct RoleProcess {
    name: String,
    host: Host,
    command: String,
    child: Child,
    /// Held open while the role should run; dropping it is the stop.
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

/// How long a role may take to report it listens: ssh needs a connection first.
fn ready_timeout(host: &Host) -> Duration {
    if host.is_this_machine() {
        Duration::from_secs(15)
    } else {
        Duration::from_secs(40)
    }
}

/// How long a stopped role may take to drain and print its counters before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A process started on a host, its output being collected.
struct Spawned {
    child: Child,
    /// The command, as a shell would show it.
    command: String,
    /// Standard output and error, in arrival order.
    output: Arc<Mutex<String>>,
    /// Standard output alone (a client's JSON).
    stdout: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// The addresses of each `ringlab ready:` line.
    ready: mpsc::Receiver<String>,
}

/// Spawns `ringlab ARGS` on `host` with piped standard streams, in a process group of its own
/// (a Ctrl-C at the terminal reaches the sweep, which then stops the roles in order).
fn spawn(host: &Host, bins: &Bins, args: &[String]) -> io::Result<Spawned> {
    let mut cmd = host.command(&bins.local, &bins.remote, args);
    let command = command_line(&cmd);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| host.cannot_start(e))?;
    let output = Arc::new(Mutex::new(String::new()));
    let stdout_only = Arc::new(Mutex::new(String::new()));
    let (ready_tx, ready) = mpsc::channel();
    let mut readers = Vec::new();
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let (out, only) = (output.clone(), stdout_only.clone());
    readers.push(std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(rest) = line.strip_prefix("ringlab ready: ") {
                let _ = ready_tx.send(rest.to_string());
            }
            push_line(&out, &line);
            push_line(&only, &line);
        }
    }));
    let out = output.clone();
    readers.push(std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            push_line(&out, &line);
        }
    }));
    Ok(Spawned {
        child,
        command,
        output,
        stdout: stdout_only,
        readers,
        ready,
    })
}

/// What a collector holds so far.
fn snapshot(out: &Mutex<String>) -> String {
    out.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Waits for the output readers, which end with the process's pipes.
fn join_all(readers: Vec<std::thread::JoinHandle<()>>) {
    for r in readers {
        let _ = r.join();
    }
}

fn push_line(out: &Mutex<String>, line: &str) {
    let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
    o.push_str(line);
    o.push('\n');
}

/// A command as a shell would show it.
fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program().to_string_lossy().into_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .map(|w| crate::lab::hosts::shell_quote(&w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The binaries: this one for this machine and its namespaces, `remote` over ssh.
#[derive(Debug, Clone)]
struct Bins {
    local: PathBuf,
    remote: String,
}

impl RoleProcess {
    /// Starts a server role and waits until it says where it listens.
    fn start(
        name: &str,
        host: &Host,
        bins: &Bins,
        args: Vec<String>,
        stop: &Shutdown,
    ) -> io::Result<(RoleProcess, Vec<SocketAddr>)> {
        let Spawned {
            child,
            command,
            output,
            readers,
            ready,
            ..
        } = spawn(host, bins, &args)?;
        let mut role = RoleProcess {
            name: name.to_string(),
            host: host.clone(),
            command,
            child,
            stdin: None,
            output,
            readers,
        };
        role.stdin = role.child.stdin.take();
        let deadline = Instant::now() + ready_timeout(host);
        loop {
            match ready.recv_timeout(Duration::from_millis(50)) {
                Ok(addrs) => {
                    let addrs = addrs
                        .split_whitespace()
                        .filter_map(|a| a.parse().ok())
                        .collect();
                    return Ok((role, addrs));
                }
                Err(mpsc::RecvTimeoutError::Disconnected)
                | Err(mpsc::RecvTimeoutError::Timeout)
                    if role.child.try_wait()?.is_some() =>
                {
                    let report = role.stop();
                    return Err(io::Error::other(format!(
                        "{name} on {host} did not start ({}): {}",
                        report.ended,
                        tail(&report.output, 3)
                    )));
                }
                Err(_) if stop.is_triggered() => {
                    drop(role);
                    return Err(io::Error::new(io::ErrorKind::Interrupted, "interrupted"));
                }
                Err(_) if Instant::now() > deadline => {
                    let report = role.stop();
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "{name} on {host} did not report listening within {:?}: {}",
                            ready_timeout(host),
                            tail(&report.output, 3)
                        ),
                    ));
                }
                Err(_) => {}
            }
        }
    }

    /// The process's pid here: the server itself for this machine and namespaces (`ip netns
    /// exec` replaces itself with ringlab); the ssh client for a remote host.
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes its standard input (the stop), waits for it to drain and exit, kills it after
    /// [`STOP_GRACE`], and returns what it printed.
    fn stop(mut self) -> RoleReport {
        self.stdin.take();
        let ended = wait_or_kill(&mut self.child, STOP_GRACE);
        join_all(std::mem::take(&mut self.readers));
        let output = snapshot(&self.output);
        RoleReport {
            name: self.name.clone(),
            host: self.host.to_string(),
            command: self.command.clone(),
            ended,
            output,
        }
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        if self.stdin.take().is_some() {
            let _ = wait_or_kill(&mut self.child, STOP_GRACE);
        }
    }
}

/// Waits up to `grace` for `child`, then kills it; says how it ended.
fn wait_or_kill(child: &mut Child, grace: Duration) -> String {
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return format!("killed after {grace:?} without exiting");
            }
        }
    }
}

/// The last `n` non-empty lines of `text`, joined.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(no output)".into();
    }
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// One target of the placed lab, with the processes here that serve it.
struct PlacedTarget {
    target: NamedTarget,
    /// Pids on this machine serving it (none for a remote host), whose CPU time per request
    /// each cell records.
    pids: Vec<u32>,
}

/// The lab running as processes on its hosts.
pub struct PlacedLab {
    plan: HostPlan,
    bins: Bins,
    io: IoMode,
    roles: Vec<RoleProcess>,
    targets: Vec<PlacedTarget>,
    /// Each host's facts, asked before anything started.
    pub hosts: Vec<HostFacts>,
    /// How the driver was set up, as the first backend reported it.
    pub driver: String,
}

/// One cell for the clients.
#[derive(Debug, Clone, Copy)]
pub struct ClientCell {
    /// Requests in total, shared out.
    pub requests: u64,
    /// Concurrency in total, shared out.
    pub concurrency: usize,
    /// Offered rate in total (open loop), shared out.
    pub rate: Option<f64>,
    /// How intended send times are spaced.
    pub arrival: Arrival,
    /// An open-loop cell's duration.
    pub time_limit: Option<Duration>,
    /// Reuse connections.
    pub keep_alive: bool,
    /// Per-request timeout.
    pub timeout: Duration,
}

impl PlacedLab {
    /// Asks every host for its facts, then starts the backends, the direct and threaded servers
    /// and the balancers on their hosts (each waited for until it listens). On a failure what
    /// did start is stopped.
    pub fn start(
        plan: &HostPlan,
        ports: &Ports,
        placement: &Placement,
        setup: &LabSetup,
        stop: &Shutdown,
    ) -> io::Result<PlacedLab> {
        let bins = Bins {
            local: std::env::current_exe()?,
            remote: plan.remote_bin.clone(),
        };
        let mut hosts = Vec::new();
        for (host, roles) in plan.hosts() {
            let machine = host.facts(&bins.local, &bins.remote)?;
            hosts.push(HostFacts {
                host: host.to_string(),
                roles,
                address: host.address()?,
                machine,
            });
        }
        let mut lab = PlacedLab {
            plan: plan.clone(),
            bins,
            io: setup.io,
            roles: Vec::new(),
            targets: Vec::new(),
            hosts,
            driver: String::new(),
        };
        lab.start_servers(ports, placement, setup, stop)?;
        Ok(lab)
    }

    fn start_servers(
        &mut self,
        ports: &Ports,
        placement: &Placement,
        setup: &LabSetup,
        stop: &Shutdown,
    ) -> io::Result<()> {
        let io = flag(&self.io);
        let common = |role: &str| {
            vec![
                role.to_string(),
                "--supervised".into(),
                "--io".into(),
                io.clone(),
            ]
        };
        let server_cpu = |host: &Host, args: &mut Vec<String>| {
            if host.is_this_machine() {
                args.extend(["--cpu".into(), placement.servers.to_string()]);
            }
        };
        // The backends, spread over their hosts in turn, one process per host.
        let mut backends: Vec<SocketAddr> = Vec::new();
        let mut backend_pids = Vec::new();
        for (j, host) in self.plan.backends.clone().iter().enumerate() {
            let mine: Vec<u16> = ports
                .backends
                .iter()
                .enumerate()
                .filter(|(i, _)| i % self.plan.backends.len() == j)
                .map(|(_, &p)| p)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let ip = self.address(host);
            let mut args = common("backend");
            for p in &mine {
                args.extend(["--listen".into(), SocketAddr::new(ip, *p).to_string()]);
            }
            server_cpu(host, &mut args);
            if setup.delay != Default::default() {
                args.extend(["--delay".into(), setup.delay.to_string()]);
            }
            for (port, d) in setup.delay_on.iter().filter(|(p, _)| mine.contains(p)) {
                args.extend(["--delay-on".into(), format!("{port}={d}")]);
            }
            let (role, addrs) = RoleProcess::start("backends", host, &self.bins, args, stop)?;
            if self.driver.is_empty() {
                self.driver = driver_from(&snapshot(&role.output));
            }
            if host.is_this_machine() {
                backend_pids.push(role.pid());
            }
            backends.extend(addrs);
            self.roles.push(role);
        }
        let first = self.plan.backends[0].clone();
        let first_ip = self.address(&first);
        let mut args = common("backend");
        args.extend([
            "--listen".into(),
            SocketAddr::new(first_ip, ports.direct).to_string(),
        ]);
        server_cpu(&first, &mut args);
        let (direct, direct_addr) = RoleProcess::start("direct", &first, &self.bins, args, stop)?;
        let direct_pid = direct.pid();
        self.roles.push(direct);
        let threaded = match ports.threaded {
            Some(port) => {
                let args = vec![
                    "threaded".into(),
                    "--supervised".into(),
                    "--listen".into(),
                    SocketAddr::new(first_ip, port).to_string(),
                ];
                let (t, addr) = RoleProcess::start("threaded", &first, &self.bins, args, stop)?;
                let pid = t.pid();
                self.roles.push(t);
                Some((addr, pid))
            }
            None => None,
        };
        // The balancers: one per mode and policy, the first policy on the lab's ports.
        let lb_host = self.plan.lb.clone();
        let lb_ip = self.address(&lb_host);
        let several = setup.policies.len() > 1;
        let backend_list: Vec<String> = backends.iter().map(|a| a.port().to_string()).collect();
        for (i, policy) in setup.policies.iter().enumerate() {
            for &mode in &setup.modes {
                let port = match (i, mode) {
                    (0, Mode::Tcp) => ports.lb,
                    (0, Mode::Http) => ports.lb_http,
                    _ => 0,
                };
                let mut name = match mode {
                    Mode::Tcp => "lb".to_string(),
                    Mode::Http => "lb-http".to_string(),
                };
                if several {
                    name = format!("{name}-{policy}");
                }
                let mut args = common("lb");
                args.extend([
                    "--listen".into(),
                    SocketAddr::new(lb_ip, port).to_string(),
                    "--mode".into(),
                    flag(&mode),
                    "--policy".into(),
                    flag(policy),
                ]);
                for b in &backends {
                    args.extend(["--backend".into(), b.to_string()]);
                }
                if lb_host.is_this_machine() {
                    let cpus = match mode {
                        Mode::Tcp => &placement.lb,
                        Mode::Http => &placement.lb_http,
                    };
                    args.extend(["--cpus".into(), format_cpus(cpus)]);
                }
                let (role, addrs) = RoleProcess::start(&name, &lb_host, &self.bins, args, stop)?;
                let mut pids = backend_pids.clone();
                if lb_host.is_this_machine() {
                    pids.push(role.pid());
                }
                self.roles.push(role);
                self.targets.push(PlacedTarget {
                    target: NamedTarget {
                        name,
                        addr: addrs[0],
                        description: format!(
                            "ringlab lb --mode {mode} --policy {policy} ({} sockets) on {lb_host} \
                             over backends on ports {} on {}",
                            self.io,
                            backend_list.join(", "),
                            hosts_list(&self.plan.backends)
                        ),
                        client_cpus: match mode {
                            Mode::Tcp => placement.lb_client.clone(),
                            Mode::Http => placement.lb_http_client.clone(),
                        },
                        io: Some(self.io),
                    },
                    pids: if lb_host.is_this_machine() {
                        pids
                    } else {
                        Vec::new()
                    },
                });
            }
        }
        self.targets.push(PlacedTarget {
            target: NamedTarget {
                name: "direct".into(),
                addr: direct_addr[0],
                description: format!(
                    "ringlab backend ({} sockets) on {first}, hit directly (one glommio executor)",
                    self.io
                ),
                client_cpus: placement.client.clone(),
                io: Some(self.io),
            },
            pids: if first.is_this_machine() {
                vec![direct_pid]
            } else {
                Vec::new()
            },
        });
        if let Some((addr, pid)) = threaded {
            self.targets.push(PlacedTarget {
                target: NamedTarget {
                    name: "threaded".into(),
                    addr: addr[0],
                    description: format!(
                        "ringlab threaded on {first}, one OS thread per connection (unpinned)"
                    ),
                    client_cpus: placement.client.clone(),
                    io: None,
                },
                pids: if first.is_this_machine() {
                    vec![pid]
                } else {
                    Vec::new()
                },
            });
        }
        Ok(())
    }

    /// The address the other roles reach `host` at, as found once when the lab started.
    fn address(&self, host: &Host) -> IpAddr {
        let name = host.to_string();
        self.hosts
            .iter()
            .find(|h| h.host == name)
            .map(|h| h.address)
            .expect("every placed host's address is found before the roles start")
    }

    /// The targets, in the lab's order.
    pub fn targets(&self) -> Vec<NamedTarget> {
        self.targets.iter().map(|t| t.target.clone()).collect()
    }

    /// The processes on this machine serving `target` (empty on a remote host).
    pub fn pids(&self, target: &str) -> Vec<u32> {
        self.targets
            .iter()
            .find(|t| t.target.name == target)
            .map(|t| t.pids.clone())
            .unwrap_or_default()
    }

    /// One line on where everything runs.
    pub fn describe(&self, placement: &Placement) -> String {
        let here = |h: &Host, cpus: String| {
            if h.is_this_machine() {
                format!("{h} (CPU {cpus})")
            } else {
                format!("{h} (its own defaults)")
            }
        };
        format!(
            "separate processes: backends, direct and threaded on {}; lb on {}, lb-http on {}; \
             clients on {}{}",
            self.plan
                .backends
                .iter()
                .map(|h| here(h, placement.servers.to_string()))
                .collect::<Vec<_>>()
                .join(", "),
            here(&self.plan.lb, format_cpus(&placement.lb)),
            here(&self.plan.lb, format_cpus(&placement.lb_http)),
            self.plan
                .clients
                .iter()
                .map(|h| here(h, "as each target's client".into()))
                .collect::<Vec<_>>()
                .join(", "),
            self.plan
                .origin
                .as_deref()
                .map(|o| format!("; {o}"))
                .unwrap_or_default()
        )
    }

    /// Measures one cell from the client hosts: each runs `ringlab bench` for its share of the
    /// concurrency, requests and rate, all starting at one wall-clock time; their results are
    /// merged exactly (histograms add). A stop asked for mid-cell closes their standard input,
    /// which interrupts them.
    pub fn bench(
        &self,
        target: &NamedTarget,
        cell: ClientCell,
        stop: &Shutdown,
    ) -> io::Result<BenchResult> {
        let k = self.plan.clients.len().min(cell.concurrency).max(1);
        let shares = split(cell.concurrency as u64, k);
        let requests = split_weighted(cell.requests, &shares);
        let remote = self.plan.clients[..k].iter().any(|h| !h.is_this_machine());
        // Time enough for every client to start (ssh connects first) before the shared start.
        let lead = if remote { 3000 } else { 300 };
        let start_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            + lead;
        let mut running = Vec::new();
        for (i, host) in self.plan.clients[..k].iter().enumerate() {
            let c = shares[i] as usize;
            let rate = cell.rate.map(|r| r * c as f64 / cell.concurrency as f64);
            let mut args = vec![
                "bench".to_string(),
                "--supervised".into(),
                "--format".into(),
                "json".into(),
                "--start-at".into(),
                start_at.to_string(),
                "-n".into(),
                requests[i].to_string(),
                "-c".into(),
                c.to_string(),
                "-s".into(),
                format!("{}ms", cell.timeout.as_millis()),
                "--io".into(),
                flag(&self.io),
            ];
            if cell.keep_alive {
                args.push("-k".into());
            }
            if let Some(rate) = rate {
                args.extend([
                    "--rate".into(),
                    format!("{rate:.3}"),
                    "--arrival".into(),
                    flag(&cell.arrival),
                ]);
            }
            if let Some(t) = cell.time_limit {
                args.extend(["-t".into(), format!("{}ms", t.as_millis())]);
            }
            if host.is_this_machine() {
                args.extend(["--cpus".into(), format_cpus(&target.client_cpus)]);
            }
            args.push(format!("http://{}/", target.addr));
            let mut spawned = spawn(host, &self.bins, &args)?;
            let stdin = spawned.child.stdin.take();
            running.push((host.clone(), spawned, stdin, c, rate));
        }
        // Wait for all; a stop closes their standard input, which interrupts them.
        loop {
            let mut all_done = true;
            for (_, spawned, stdin, ..) in running.iter_mut() {
                if spawned.child.try_wait()?.is_none() {
                    all_done = false;
                    if stop.is_triggered() {
                        stdin.take();
                    }
                }
            }
            if all_done {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut parts = Vec::new();
        let mut shares_out = Vec::new();
        for (host, mut spawned, _stdin, c, rate) in running {
            let status = spawned.child.wait()?;
            join_all(spawned.readers);
            let json = snapshot(&spawned.stdout);
            let Ok(mut r) = serde_json::from_str::<BenchResult>(&json) else {
                let all = snapshot(&spawned.output);
                return Err(io::Error::other(format!(
                    "the client on {host} ({status}) gave no result: {} (command: {})",
                    tail(&all, 3),
                    spawned.command
                )));
            };
            r.histogram = hgrm::decode(&r.latency_histogram).map_err(io::Error::other)?;
            if status.code() == Some(130) {
                r.interrupted = true;
            }
            shares_out.push(ClientShare {
                host: host.to_string(),
                concurrency: c,
                offered_rate: rate,
                complete: r.complete,
                failed: r.failed.total(),
                elapsed_secs: r.elapsed_secs,
                latency_histogram: r.latency_histogram.clone(),
            });
            parts.push(r);
        }
        let mut merged = merge::merge(&parts).map_err(io::Error::other)?;
        if parts.len() > 1 {
            merged.clients = shares_out;
        }
        Ok(merged)
    }

    /// Stops every role (closing all their inputs at once, then waiting for each) and returns
    /// what each printed, its counters last.
    pub fn stop(mut self) -> Vec<RoleReport> {
        for r in &mut self.roles {
            r.stdin.take();
        }
        // Balancers first in the report, as they were measured; all were asked to stop above.
        let roles = std::mem::take(&mut self.roles);
        roles.into_iter().rev().map(RoleProcess::stop).collect()
    }
}

/// How far the client host farthest from its share of the load was: each one's share of the
/// summed req/s against its share of the concurrency, as a signed fraction (+0.05: 5% more than
/// its share).
pub fn share_deviation(parts: &[ClientShare]) -> f64 {
    let rate: f64 = parts.iter().map(ClientShare::requests_per_sec).sum();
    let conns: usize = parts.iter().map(|p| p.concurrency).sum();
    if rate <= 0.0 || conns == 0 {
        return 0.0;
    }
    parts
        .iter()
        .map(|p| (p.requests_per_sec() / rate) / (p.concurrency as f64 / conns as f64) - 1.0)
        .fold(
            0.0,
            |worst: f64, d| if d.abs() > worst.abs() { d } else { worst },
        )
}

/// A value as its command-line flag takes it (`fixed`, `least-conn`), not as it prints.
fn flag<T: clap::ValueEnum>(value: &T) -> String {
    value
        .to_possible_value()
        .map_or_else(String::new, |v| v.get_name().to_string())
}

/// `n` split into `k` shares differing by at most one, larger first.
fn split(n: u64, k: usize) -> Vec<u64> {
    let k = k.max(1) as u64;
    (0..k).map(|i| n / k + u64::from(i < n % k)).collect()
}

/// `n` split in proportion to `weights`, the remainder to the first shares, every share at
/// least its weight when `n` is at least their sum (each client at least one request per
/// connection it holds).
fn split_weighted(n: u64, weights: &[u64]) -> Vec<u64> {
    let total: u64 = weights.iter().sum::<u64>().max(1);
    let mut shares: Vec<u64> = weights.iter().map(|w| n * w / total).collect();
    let mut left = n - shares.iter().sum::<u64>();
    for s in shares.iter_mut() {
        if left == 0 {
            break;
        }
        *s += 1;
        left -= 1;
    }
    shares
}

/// The hosts, comma-separated.
fn hosts_list(hosts: &[Host]) -> String {
    hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The driver's set-up from a server's start-up line (`sockets on io_uring (…)`).
fn driver_from(output: &str) -> String {
    output
        .lines()
        .find_map(|l| l.split_once("sockets on ").map(|(_, d)| d))
        .map(|d| {
            d.split(')')
                .next()
                .map_or(d.to_string(), |s| format!("{s})"))
        })
        .unwrap_or_else(|| "as its start-up line says".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_add_up_and_differ_by_at_most_one() {
        assert_eq!(split(5, 2), vec![3, 2]);
        assert_eq!(split(4, 2), vec![2, 2]);
        assert_eq!(split(1, 1), vec![1]);
        let w = split(5, 2);
        let n = split_weighted(1001, &w);
        assert_eq!(n.iter().sum::<u64>(), 1001);
        assert!(n[0] >= w[0] && n[1] >= w[1]);
        assert_eq!(split_weighted(200, &[1, 1]), vec![100, 100]);
    }

    #[test]
    fn the_driver_is_read_off_the_start_up_line() {
        assert_eq!(
            driver_from(
                "ringlab backend: serving 1.2.3.4:5 on CPU 1 (one glommio executor; sockets on io_uring (SINGLE_ISSUER|DEFER_TASKRUN)); Ctrl-C to stop"
            ),
            "io_uring (SINGLE_ISSUER|DEFER_TASKRUN)"
        );
    }
}
