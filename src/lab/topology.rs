//! The lab's topology started in-process on a chosen core placement: four backends, the balancer
//! in front of them (TCP mode, and HTTP mode beside it; one pair per policy), the direct async
//! server and the threaded server.

use std::io;
use std::net::SocketAddr;

use serde::Serialize;

use crate::io::driver::IoMode;
use crate::io::listen;
use crate::io::placement::{self, Executor};
use crate::io::shutdown::Shutdown;
use crate::serve::backend::{self, BackendConfig, Delay, ListenerStats};
use crate::serve::balancer::{self, BalancerConfig, BalancerReport, Mode};
use crate::serve::policy::Policy;
use crate::serve::threaded;

/// The ports each piece listens on (0: any free port, as tests use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ports {
    /// The backends behind the balancer.
    pub backends: Vec<u16>,
    /// The balancer (TCP mode).
    pub lb: u16,
    /// The balancer in HTTP mode, over the same backends.
    pub lb_http: u16,
    /// The direct async backend.
    pub direct: u16,
    /// The thread-per-connection server (`None`: not started).
    pub threaded: Option<u16>,
}

impl Ports {
    /// The original lab's ports: 9002–9005 behind 44444, direct 45000, threaded 46000; and the
    /// HTTP-mode balancer, which the original lab did not have, on 44480.
    pub fn lab() -> Ports {
        Ports {
            backends: vec![9002, 9003, 9004, 9005],
            lb: 44444,
            lb_http: 44480,
            direct: 45000,
            threaded: Some(46000),
        }
    }

    /// Free ports chosen by the kernel, so a lab can run beside another one.
    pub fn ephemeral() -> Ports {
        Ports {
            backends: vec![0; 4],
            lb: 0,
            lb_http: 0,
            direct: 0,
            threaded: Some(0),
        }
    }

    /// Free ports for a second lab beside the first, without a threaded server (it has no
    /// socket driver, so one is enough).
    pub fn beside() -> Ports {
        Ports {
            threaded: None,
            ..Ports::ephemeral()
        }
    }
}

/// Which CPU runs what. Printed at start and recorded with every result.
///
/// The client's CPUs depend on the target: the balancer's request path is the busiest (two TCP
/// connections per request, kernel work charged to whoever sends), so while it is measured it
/// gets a core to itself and its client shares the backends' core; a direct server is measured
/// with the client on the other core. README.md ("Placement") has the measurements behind this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The client's executors when measuring a direct server (and any `--target`).
    pub client: Vec<usize>,
    /// The client's executors when measuring the in-process balancer.
    pub lb_client: Vec<usize>,
    /// The balancer's executors (one each).
    pub lb: Vec<usize>,
    /// The HTTP-mode balancer's executors (one each).
    pub lb_http: Vec<usize>,
    /// The client's executors when measuring the HTTP-mode balancer.
    pub lb_http_client: Vec<usize>,
    /// The backends' executor, the direct server's executor and the threaded server's threads.
    pub servers: usize,
}

impl Placement {
    /// The measured default: every server on the last CPU; the TCP-mode balancer alone on the
    /// first with its client beside the backends; the HTTP-mode balancer beside its backends
    /// (its pooled backend connections make them light) with its client alone on the first; a
    /// direct server's client on the first. On one CPU everything shares it.
    pub fn default_for(cpus: &[usize]) -> Placement {
        let first = cpus.first().copied().unwrap_or(0);
        let last = cpus.last().copied().unwrap_or(0);
        Placement {
            client: vec![first],
            lb_client: vec![last],
            lb: vec![first],
            lb_http: vec![last],
            lb_http_client: vec![first],
            servers: last,
        }
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        format!(
            "lb CPU {} with its client on CPU {}; lb-http CPU {} with its client on CPU {}; \
             servers (backends, direct, threaded) CPU {} with the client on CPU {} for direct and \
             threaded",
            placement::format_cpus(&self.lb),
            placement::format_cpus(&self.lb_client),
            placement::format_cpus(&self.lb_http),
            placement::format_cpus(&self.lb_http_client),
            self.servers,
            placement::format_cpus(&self.client),
        )
    }

    /// Checks every CPU named is available.
    pub fn check(&self) -> io::Result<()> {
        let all = self
            .client
            .iter()
            .chain(&self.lb_client)
            .chain(&self.lb)
            .chain(&self.lb_http)
            .chain(&self.lb_http_client);
        for &cpu in all.chain([&self.servers]) {
            placement::check_cpu(cpu)?;
        }
        Ok(())
    }
}

/// A named address to measure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NamedTarget {
    /// Short name used in tables and the chart (`lb`, `direct`, `threaded`, or the user's).
    pub name: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// What it is, for the report.
    pub description: String,
    /// The client's CPUs for this target.
    pub client_cpus: Vec<usize>,
    /// The socket driver the target runs on, when the sweep started it.
    pub io: Option<IoMode>,
}

/// What the in-process lab runs, beyond its ports and placement.
#[derive(Debug, Clone, PartialEq)]
pub struct LabSetup {
    /// The socket driver of the glommio servers.
    pub io: IoMode,
    /// Balancer policies: one TCP-mode and one HTTP-mode balancer per policy.
    pub policies: Vec<Policy>,
    /// Balancer modes: one balancer per mode and policy.
    pub modes: Vec<Mode>,
    /// The backends' service time (all of them).
    pub delay: Delay,
    /// Per-backend service times, by port.
    pub delay_on: Vec<(u16, Delay)>,
}

impl Default for LabSetup {
    fn default() -> LabSetup {
        LabSetup {
            io: IoMode::default(),
            policies: vec![Policy::RoundRobin],
            modes: vec![Mode::Tcp, Mode::Http],
            delay: Delay::None,
            delay_on: Vec::new(),
        }
    }
}

/// One balancer of the lab.
struct LabBalancer {
    /// Its target name (`lb`, `lb-http`, `lb-least-conn`, …).
    name: String,
    addr: SocketAddr,
    mode: Mode,
    policy: Policy,
    executors: Vec<Executor<io::Result<BalancerReport>>>,
}

/// The running in-process lab.
pub struct Lab {
    /// The backends behind the balancers.
    pub backends: Vec<SocketAddr>,
    /// The direct async server.
    pub direct: SocketAddr,
    /// The threaded server, if started.
    pub threaded: Option<SocketAddr>,
    /// The socket driver of the glommio servers.
    pub io: IoMode,
    /// How that driver was set up (the kernel's accepted ring flags, say).
    pub driver: String,
    shutdown: Shutdown,
    backend_ex: Option<Executor<io::Result<Vec<ListenerStats>>>>,
    direct_ex: Option<Executor<io::Result<Vec<ListenerStats>>>>,
    balancers: Vec<LabBalancer>,
    threaded_thread: Option<std::thread::JoinHandle<io::Result<ListenerStats>>>,
}

impl Lab {
    /// Binds every port first (so a port in use fails before anything starts), then starts the
    /// servers on `placement` as `setup` says. The first policy's balancers take the lab's
    /// balancer ports; more policies' get free ports.
    pub fn start(ports: &Ports, placement: &Placement, setup: &LabSetup) -> io::Result<Lab> {
        placement.check()?;
        let host = [127, 0, 0, 1];
        let addr = |p: u16| SocketAddr::from((host, p));
        let backend_listeners = ports
            .backends
            .iter()
            .map(|&p| listen::bind_one(addr(p)))
            .collect::<io::Result<Vec<_>>>()?;
        // (name, mode, policy, listeners), every port bound before anything starts.
        let several = setup.policies.len() > 1;
        let mut planned = Vec::new();
        for (i, &policy) in setup.policies.iter().enumerate() {
            for &mode in &setup.modes {
                let port = match mode {
                    Mode::Tcp => ports.lb,
                    Mode::Http => ports.lb_http,
                };
                let port = if i == 0 { port } else { 0 };
                let mut name = match mode {
                    Mode::Tcp => "lb".to_string(),
                    Mode::Http => "lb-http".to_string(),
                };
                if several {
                    name = format!("{name}-{policy}");
                }
                let executors = match mode {
                    Mode::Tcp => placement.lb.len(),
                    Mode::Http => placement.lb_http.len(),
                };
                let listeners = listen::bind_shared(addr(port), executors)?;
                planned.push((name, mode, policy, listeners));
            }
        }
        let direct_listener = listen::bind_one(addr(ports.direct))?;
        let threaded_listener = ports
            .threaded
            .map(|p| listen::bind_one(addr(p)))
            .transpose()?;

        let backends = backend_listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let direct = direct_listener.local_addr()?;
        let threaded_addr = threaded_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;

        let shutdown = Shutdown::new();
        let io = setup.io;
        let mut lab = Lab {
            backends: backends.clone(),
            direct,
            threaded: threaded_addr,
            io,
            driver: String::new(),
            shutdown: shutdown.clone(),
            backend_ex: None,
            direct_ex: None,
            balancers: Vec::new(),
            threaded_thread: None,
        };
        // On any failure below, dropping `lab` stops what did start.
        let server_cpu = Some(placement.servers);
        let backend_config = BackendConfig {
            io,
            delay: setup.delay,
            delay_on: setup.delay_on.clone(),
            ..BackendConfig::default()
        };
        let backend_ex = backend::spawn(
            backend_listeners,
            server_cpu,
            backend_config,
            shutdown.clone(),
        )?;
        lab.driver = backend_ex.driver.clone();
        lab.backend_ex = Some(backend_ex);
        lab.direct_ex = Some(backend::spawn(
            vec![direct_listener],
            server_cpu,
            BackendConfig {
                io,
                ..BackendConfig::default()
            },
            shutdown.clone(),
        )?);
        let cpus = |list: &[usize]| list.iter().copied().map(Some).collect::<Vec<_>>();
        for (name, mode, policy, listeners) in planned {
            let addr = listeners[0].local_addr()?;
            let lb_cpus = match mode {
                Mode::Tcp => cpus(&placement.lb),
                Mode::Http => cpus(&placement.lb_http),
            };
            let executors = balancer::spawn(
                listeners,
                &lb_cpus,
                BalancerConfig {
                    io,
                    mode,
                    policy,
                    ..BalancerConfig::new(backends.clone())
                },
                shutdown.clone(),
            )?;
            lab.balancers.push(LabBalancer {
                name,
                addr,
                mode,
                policy,
                executors,
            });
        }
        if let Some(threaded_listener) = threaded_listener {
            let stopper = shutdown.clone();
            let cpu = placement.servers;
            lab.threaded_thread = Some(
                std::thread::Builder::new()
                    .name("threaded-accept".into())
                    .spawn(move || {
                        // Connection threads inherit this affinity, so the threaded server gets
                        // the same core as the async servers: a like-for-like comparison.
                        placement::pin_current_thread(cpu)?;
                        threaded::serve(threaded_listener, BackendConfig::default(), stopper)
                    })?,
            );
        }
        Ok(lab)
    }

    /// The address of the balancer named `name` (`lb`, `lb-http`, …).
    pub fn balancer(&self, name: &str) -> Option<SocketAddr> {
        self.balancers
            .iter()
            .find(|b| b.name == name)
            .map(|b| b.addr)
    }

    /// The measured targets, in the lab's order, with their client placement. With `suffix`
    /// (several labs side by side, one per driver) the names carry the driver: `lb-uring`.
    pub fn targets(&self, placement: &Placement, suffix: bool) -> Vec<NamedTarget> {
        let backends: Vec<String> = self.backends.iter().map(|a| a.port().to_string()).collect();
        let name = |base: &str| {
            if suffix {
                format!("{base}-{}", self.io)
            } else {
                base.to_string()
            }
        };
        let mut targets: Vec<NamedTarget> = self
            .balancers
            .iter()
            .map(|b| NamedTarget {
                name: name(&b.name),
                addr: b.addr,
                description: format!(
                    "ringlab lb --mode {} --policy {} ({} sockets) over backends on ports {}",
                    b.mode,
                    b.policy,
                    self.io,
                    backends.join(", ")
                ),
                client_cpus: match b.mode {
                    Mode::Tcp => placement.lb_client.clone(),
                    Mode::Http => placement.lb_http_client.clone(),
                },
                io: Some(self.io),
            })
            .collect();
        targets.push(NamedTarget {
            name: name("direct"),
            addr: self.direct,
            description: format!(
                "ringlab backend ({} sockets), hit directly (one glommio executor)",
                self.io
            ),
            client_cpus: placement.client.clone(),
            io: Some(self.io),
        });
        if let Some(addr) = self.threaded {
            targets.push(NamedTarget {
                name: "threaded".into(),
                addr,
                description: "ringlab threaded, one OS thread per connection".into(),
                client_cpus: placement.client.clone(),
                io: None,
            });
        }
        targets
    }

    /// Stops everything gracefully and waits for it.
    pub fn stop(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.shutdown.trigger();
        for b in self.balancers.drain(..) {
            for ex in b.executors {
                let _ = ex.join();
            }
        }
        for ex in [self.backend_ex.take(), self.direct_ex.take()]
            .into_iter()
            .flatten()
        {
            let _ = ex.join();
        }
        if let Some(t) = self.threaded_thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop_all();
    }
}
