//! `--metrics`: the balancer's and the backend's Prometheus endpoints, scraped over real sockets
//! after real traffic, parsed by a Prometheus text-format parser, and checked against the
//! traffic sent.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{bench_config, driver, running};
use prometheus_parse::{Scrape, Value};
use ringlab::io::listen;
use ringlab::io::shutdown::Shutdown;
use ringlab::lab::client;
use ringlab::serve::backend::{self, BackendConfig};
use ringlab::serve::balancer::{self, BalancerConfig, Mode};
use ringlab::serve::metrics::PUBLISH_EVERY;

fn scrape(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    (head.to_string(), body.to_string())
}

fn parse(body: &str) -> Scrape {
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("valid exposition format")
}

/// The value of the sample named `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found = s
        .samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no {name} {labels:?}"));
    match &found.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(buckets) => buckets.last().map_or(0.0, |b| b.count),
        Value::Summary(_) => panic!("{name} is a summary"),
    }
}

both_drivers! {
fn the_endpoints_parse_and_count_the_traffic_sent() {
    for mode in [Mode::Tcp, Mode::Http] {
        // Two backends on one executor, with metrics.
        let backend_listeners: Vec<_> = (0..2)
            .map(|_| listen::bind_one("127.0.0.1:0".parse().unwrap()).unwrap())
            .collect();
        let backends: Vec<SocketAddr> =
            backend_listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let backend_metrics = listen::bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        let backend_scrape = backend_metrics.local_addr().unwrap();
        let stop = Shutdown::new();
        let ex = backend::spawn_watched(
            backend_listeners,
            None,
            BackendConfig { io: driver(), ..BackendConfig::default() },
            stop.clone(),
            Some(backend_metrics),
        )
        .unwrap();
        let _backend = running(backends.clone(), stop, vec![ex]);

        // A balancer on two executors in front of them, with metrics.
        let listeners = listen::bind_shared("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let lb = listeners[0].local_addr().unwrap();
        let lb_metrics = listen::bind_one("127.0.0.1:0".parse().unwrap()).unwrap();
        let lb_scrape = lb_metrics.local_addr().unwrap();
        let stop = Shutdown::new();
        let exs = balancer::spawn_watched(
            listeners,
            &[None, None],
            BalancerConfig { io: driver(), mode, ..BalancerConfig::new(backends.clone()) },
            stop.clone(),
            Some(lb_metrics),
        )
        .unwrap();
        let _lb = running(vec![lb], stop, exs);

        let r = client::run(bench_config(lb, 200, 4)).unwrap();
        assert_eq!((r.complete, r.failed.total()), (200, 0));
        // Counters reach the endpoint within one publishing period.
        std::thread::sleep(PUBLISH_EVERY * 3);

        let (head, body) = scrape(lb_scrape, "/metrics");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("text/plain; version=0.0.4"), "{head}");
        let lb_metrics = parse(&body);
        assert_eq!(value(&lb_metrics, "ringlab_lb_connections_accepted_total", &[]), 200.0);
        assert_eq!(value(&lb_metrics, "ringlab_lb_connections_active", &[]), 0.0);
        let per_backend = match mode {
            Mode::Tcp => "ringlab_lb_backend_connections_total",
            Mode::Http => "ringlab_lb_backend_requests_total",
        };
        // Each executor keeps its own rotation, so the split is near half, and the sums exact.
        let (mut relayed, mut down, mut timed) = (0.0, 0.0, 0.0);
        for b in &backends {
            let b = b.to_string();
            let n = value(&lb_metrics, per_backend, &[("backend", &b)]);
            assert!((80.0..=120.0).contains(&n), "{mode:?}: {n} to {b}");
            relayed += n;
            // The backends are up (a gauge, published once, not summed per executor).
            assert_eq!(value(&lb_metrics, "ringlab_lb_backend_up", &[("backend", &b)]), 1.0);
            let connects =
                value(&lb_metrics, "ringlab_lb_backend_connect_seconds", &[("backend", &b)]);
            assert!(connects >= 1.0, "{mode:?}: {connects} connects timed");
            down += value(&lb_metrics, "ringlab_lb_backend_received_bytes_total", &[("backend", &b)]);
            timed += value(&lb_metrics, "ringlab_lb_backend_response_seconds", &[("backend", &b)]);
        }
        assert_eq!(relayed, 200.0, "{mode:?}");
        match mode {
            // 122 bytes per answer relayed back.
            Mode::Tcp => assert_eq!(down, 200.0 * 122.0),
            Mode::Http => {
                assert_eq!(timed, 200.0, "responses timed");
                let answered = value(
                    &lb_metrics,
                    "ringlab_lb_http_requests_total",
                    &[("outcome", "answered")],
                );
                assert_eq!(answered, 200.0);
            }
        }

        let backend_metrics = parse(&scrape(backend_scrape, "/metrics").1);
        let answered: f64 = backends
            .iter()
            .map(|b| value(&backend_metrics, "ringlab_backend_responses_total", &[("listener", &b.to_string()), ("code", "2xx")]))
            .sum();
        assert_eq!(answered, 200.0);
        assert!(scrape(lb_scrape, "/nothing").0.starts_with("HTTP/1.1 404"));
    }
}
}
