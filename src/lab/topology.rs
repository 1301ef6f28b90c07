//! The lab's topology started in-process on a chosen core placement: four backends, the balancer
//! in front of them, the direct async server and the threaded server.

use std::io;
use std::net::SocketAddr;

use serde::Serialize;

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
    /// The thread-per-connection server.
    pub threaded: u16,
}

impl Ports {
    /// The original lab's ports: 9002–9005 behind 44444, direct 45000, threaded 46000.
    pub fn lab() -> Ports {
        Ports {
            backends: vec![9002, 9003, 9004, 9005],
            lb: 44444,
            direct: 45000,
            threaded: 46000,
        }
    }

    /// Free ports chosen by the kernel, so a lab can run beside another one.
    pub fn ephemeral() -> Ports {
        Ports {
            backends: vec![0; 4],
            lb: 0,
            direct: 0,
            threaded: 0,
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
}

/// The running in-process lab.
pub struct Lab {
    /// The balancer's address.
    pub lb: SocketAddr,
    /// The backends behind it.
    pub backends: Vec<SocketAddr>,
    /// The direct async server.
    pub direct: SocketAddr,
    /// The threaded server.
    pub threaded: SocketAddr,
    shutdown: Shutdown,
    backend_ex: Option<Executor<io::Result<Vec<ListenerStats>>>>,
    direct_ex: Option<Executor<io::Result<Vec<ListenerStats>>>>,
    lb_ex: Vec<Executor<io::Result<BalancerReport>>>,
    threaded_thread: Option<std::thread::JoinHandle<io::Result<ListenerStats>>>,
}

impl Lab {
    /// Binds every port first (so a port in use fails before anything starts), then starts the
    /// servers on `placement`.
    pub fn start(ports: &Ports, placement: &Placement) -> io::Result<Lab> {
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
        let threaded_listener = listen::bind_one(addr(ports.threaded))?;

        let backends = backend_listeners
            .iter()
            .map(|l| l.local_addr())
            .collect::<io::Result<Vec<_>>>()?;
        let lb = lb_listeners[0].local_addr()?;
        let direct = direct_listener.local_addr()?;
        let threaded_addr = threaded_listener.local_addr()?;

        let shutdown = Shutdown::new();
        let mut lab = Lab {
            lb,
            backends: backends.clone(),
            direct,
            threaded: threaded_addr,
            shutdown: shutdown.clone(),
            backend_ex: None,
            direct_ex: None,
            lb_ex: Vec::new(),
            threaded_thread: None,
        };
        // On any failure below, dropping `lab` stops what did start.
        let server_cpu = Some(placement.servers);
        lab.backend_ex = Some(backend::spawn(
            backend_listeners,
            server_cpu,
            BackendConfig::default(),
            shutdown.clone(),
        )?);
        lab.direct_ex = Some(backend::spawn(
            vec![direct_listener],
            server_cpu,
            BackendConfig::default(),
            shutdown.clone(),
        )?);
        let lb_cpus: Vec<Option<usize>> = placement.lb.iter().copied().map(Some).collect();
        lab.lb_ex = balancer::spawn(
            lb_listeners,
            &lb_cpus,
            BalancerConfig::new(backends),
            shutdown.clone(),
        )?;
        let stopper = shutdown.clone();
        let cpu = placement.servers;
        lab.threaded_thread = Some(
            std::thread::Builder::new()
                .name("threaded-accept".into())
                .spawn(move || {
                    // Connection threads inherit this affinity, so the threaded server gets the
                    // same core as the async servers: a like-for-like comparison.
                    placement::pin_current_thread(cpu)?;
                    threaded::serve(threaded_listener, BackendConfig::default(), stopper)
                })?,
        );
        Ok(lab)
    }

    /// The three measured targets, in the lab's order, with their client placement.
    pub fn targets(&self, placement: &Placement) -> Vec<NamedTarget> {
        let backends: Vec<String> = self.backends.iter().map(|a| a.port().to_string()).collect();
        vec![
            NamedTarget {
                name: "lb".into(),
                addr: self.lb,
                description: format!(
                    "ringlab lb, round robin over backends on ports {}",
                    backends.join(", ")
                ),
                client_cpus: placement.lb_client.clone(),
            },
            NamedTarget {
                name: "direct".into(),
                addr: self.direct,
                description: "ringlab backend, hit directly (one glommio executor)".into(),
                client_cpus: placement.client.clone(),
            },
            NamedTarget {
                name: "threaded".into(),
                addr: self.threaded,
                description: "ringlab threaded, one OS thread per connection".into(),
                client_cpus: placement.client.clone(),
            },
        ]
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
