//! The lab's topology started in-process on a chosen core placement: four backends, the balancer
//! in front of them, the direct async server and the threaded server.

use std::io;
use std::net::SocketAddr;

use serde::Serialize;

use crate::io::driver::IoMode;
use crate::io::listen;
use crate::io::placement::{self, Executor};
use crate::io::shutdown::Shutdown;
use crate::serve::backend::{self, BackendConfig, ListenerStats};
use crate::serve::balancer::{self, BalancerConfig, BalancerReport};
use crate::serve::threaded;

/// The ports each piece listens on (0: any free port, as tests use).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ports {
    /// The backends behind the balancer.
    pub backends: Vec<u16>,
    /// The balancer.
    pub lb: u16,
    /// The direct async backend.
    pub direct: u16,
    /// The thread-per-connection server (`None`: not started).
    pub threaded: Option<u16>,
}

impl Ports {
    /// The original lab's ports: 9002–9005 behind 44444, direct 45000, threaded 46000.
    pub fn lab() -> Ports {
        Ports {
            backends: vec![9002, 9003, 9004, 9005],
            lb: 44444,
            direct: 45000,
            threaded: Some(46000),
        }
    }

    /// Free ports chosen by the kernel, so a lab can run beside another one.
    pub fn ephemeral() -> Ports {
        Ports {
            backends: vec![0; 4],
            lb: 0,
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
    /// The backends' executor, the direct server's executor and the threaded server's threads.
    pub servers: usize,
}

impl Placement {
    /// The measured default: the balancer alone on the first CPU, every server on the last, the
    /// client on whichever of the two the measured target leaves free (the last for the
    /// balancer). On one CPU everything shares it.
    pub fn default_for(cpus: &[usize]) -> Placement {
        let first = cpus.first().copied().unwrap_or(0);
        let last = cpus.last().copied().unwrap_or(0);
        Placement {
            client: vec![first],
            lb_client: vec![last],
            lb: vec![first],
            servers: last,
        }
    }

    /// One line for humans.
    pub fn describe(&self) -> String {
        format!(
            "lb CPU {} with its client on CPU {}; servers (backends, direct, threaded) CPU {} with \
             the client on CPU {} for direct and threaded",
            placement::format_cpus(&self.lb),
            placement::format_cpus(&self.lb_client),
            self.servers,
            placement::format_cpus(&self.client),
        )
    }

    /// Checks every CPU named is available.
    pub fn check(&self) -> io::Result<()> {
        let all = self.client.iter().chain(&self.lb_client).chain(&self.lb);
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

/// The running in-process lab.
pub struct Lab {
    /// The balancer's address.
    pub lb: SocketAddr,
    /// The backends behind it.
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
    lb_ex: Vec<Executor<io::Result<BalancerReport>>>,
    threaded_thread: Option<std::thread::JoinHandle<io::Result<ListenerStats>>>,
}

impl Lab {
    /// Binds every port first (so a port in use fails before anything starts), then starts the
    /// servers on `placement`, their sockets on the `io` driver.
    pub fn start(ports: &Ports, placement: &Placement, io: IoMode) -> io::Result<Lab> {
        placement.check()?;
        let host = [127, 0, 0, 1];
        let addr = |p: u16| SocketAddr::from((host, p));
        let backend_listeners = ports
            .backends
            .iter()
            .map(|&p| listen::bind_one(addr(p)))
            .collect::<io::Result<Vec<_>>>()?;
        let lb_listeners = listen::bind_shared(addr(ports.lb), placement.lb.len())?;
        let direct_listener = listen::bind_one(addr(ports.direct))?;
        let threaded_listener = ports
            .threaded
            .map(|p| listen::bind_one(addr(p)))
            .transpose()?;

        let backends = backend_listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let lb = lb_listeners[0].local_addr()?;
        let direct = direct_listener.local_addr()?;
        let threaded_addr = threaded_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;

        let shutdown = Shutdown::new();
        let mut lab = Lab {
            lb,
            backends: backends.clone(),
            direct,
            threaded: threaded_addr,
            io,
            driver: String::new(),
            shutdown: shutdown.clone(),
            backend_ex: None,
            direct_ex: None,
            lb_ex: Vec::new(),
            threaded_thread: None,
        };
        // On any failure below, dropping `lab` stops what did start.
        let server_cpu = Some(placement.servers);
        let server_config = BackendConfig {
            io,
            ..BackendConfig::default()
        };
        let backend_ex = backend::spawn(
            backend_listeners,
            server_cpu,
            server_config.clone(),
            shutdown.clone(),
        )?;
        lab.driver = backend_ex.driver.clone();
        lab.backend_ex = Some(backend_ex);
        lab.direct_ex = Some(backend::spawn(
            vec![direct_listener],
            server_cpu,
            server_config,
            shutdown.clone(),
        )?);
        let lb_cpus: Vec<Option<usize>> = placement.lb.iter().copied().map(Some).collect();
        lab.lb_ex = balancer::spawn(
            lb_listeners,
            &lb_cpus,
            BalancerConfig {
                io,
                ..BalancerConfig::new(backends)
            },
            shutdown.clone(),
        )?;
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
        let mut targets = vec![
            NamedTarget {
                name: name("lb"),
                addr: self.lb,
                description: format!(
                    "ringlab lb ({} sockets), round robin over backends on ports {}",
                    self.io,
                    backends.join(", ")
                ),
                client_cpus: placement.lb_client.clone(),
                io: Some(self.io),
            },
            NamedTarget {
                name: name("direct"),
                addr: self.direct,
                description: format!(
                    "ringlab backend ({} sockets), hit directly (one glommio executor)",
                    self.io
                ),
                client_cpus: placement.client.clone(),
                io: Some(self.io),
            },
        ];
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
        for ex in self.lb_ex.drain(..) {
            let _ = ex.join();
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
