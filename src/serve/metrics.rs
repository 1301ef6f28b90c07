//! `--metrics ADDR`: the servers' counters in Prometheus' text exposition format, served by the
//! server's own first executor. Nothing is added to the data path but two histogram bumps in
//! the balancer: each executor keeps its plain per-core counters as before and, every
//! [`PUBLISH_EVERY`], copies them as samples into its own slot here (one uncontended lock per
//! period, never per request). A scrape sums the slots, so what it reads is at most one period
//! old.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::io::accept;
use crate::io::conn::Conn;
use crate::io::shutdown::LocalStop;

/// How often each executor publishes its counters.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// The bucket bounds (seconds) of the latency histograms.
pub const BUCKETS: [f64; 12] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
];

/// What kind of metric a family is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets, a sum and a count.
    Histogram,
}

/// One metric family: its name, kind and help text.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Name, following Prometheus' conventions (`ringlab_…_total`, base units).
    pub name: &'static str,
    /// Kind.
    pub kind: Kind,
    /// One line of help.
    pub help: &'static str,
}

/// One value: a family's (full) sample name, its labels, the value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (a histogram's carry `_bucket`, `_sum`, `_count`).
    pub name: String,
    /// Label pairs, in order.
    pub labels: Vec<(&'static str, String)>,
    /// The value.
    pub value: f64,
}

/// A fixed-bucket latency histogram kept per executor (plain counts: one thread writes it).
#[derive(Debug, Clone, Default)]
pub struct Latency {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Latency {
    /// Records one duration.
    pub fn record(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.counts[i] += 1;
        }
        self.count += 1;
        self.sum += secs;
    }

    /// Its samples as a Prometheus histogram named `name`, with `labels`.
    pub fn samples(&self, name: &str, labels: &[(&'static str, String)], out: &mut Vec<Sample>) {
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i];
            let mut l = labels.to_vec();
            l.push(("le", format!("{bound}")));
            out.push(Sample {
                name: format!("{name}_bucket"),
                labels: l,
                value: cumulative as f64,
            });
        }
        let mut l = labels.to_vec();
        l.push(("le", "+Inf".into()));
        out.push(Sample {
            name: format!("{name}_bucket"),
            labels: l,
            value: self.count as f64,
        });
        out.push(Sample {
            name: format!("{name}_sum"),
            labels: labels.to_vec(),
            value: self.sum,
        });
        out.push(Sample {
            name: format!("{name}_count"),
            labels: labels.to_vec(),
            value: self.count as f64,
        });
    }
}

/// A series: a sample name and its labels.
type SeriesKey = (String, Vec<(&'static str, String)>);

/// The slots of one server's executors and the families they publish.
#[derive(Debug)]
pub struct Hub {
    families: &'static [Family],
    slots: Vec<Mutex<Vec<Sample>>>,
}

impl Hub {
    /// A hub for `executors` executors publishing `families`.
    pub fn new(families: &'static [Family], executors: usize) -> Arc<Hub> {
        Arc::new(Hub {
            families,
            slots: (0..executors).map(|_| Mutex::new(Vec::new())).collect(),
        })
    }

    /// Replaces executor `i`'s samples.
    pub fn publish(&self, i: usize, samples: Vec<Sample>) {
        if let Some(slot) = self.slots.get(i) {
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = samples;
        }
    }

    /// Every family, the executors' samples summed, in the text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let mut sums: BTreeMap<SeriesKey, f64> = BTreeMap::new();
        let mut order: Vec<SeriesKey> = Vec::new();
        for slot in &self.slots {
            for s in slot.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                let key = (s.name.clone(), s.labels.clone());
                match sums.get_mut(&key) {
                    Some(v) => *v += s.value,
                    None => {
                        sums.insert(key.clone(), s.value);
                        order.push(key);
                    }
                }
            }
        }
        let mut o = String::new();
        for f in self.families {
            let kind = match f.kind {
                Kind::Counter => "counter",
                Kind::Gauge => "gauge",
                Kind::Histogram => "histogram",
            };
            let _ = writeln!(o, "# HELP {} {}", f.name, f.help);
            let _ = writeln!(o, "# TYPE {} {kind}", f.name);
            for key in order.iter().filter(|(n, _)| belongs(n, f)) {
                let labels: Vec<String> = key
                    .1
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let labels = if labels.is_empty() {
                    String::new()
                } else {
                    format!("{{{}}}", labels.join(","))
                };
                let _ = writeln!(o, "{}{labels} {}", key.0, sums[key]);
            }
        }
        o
    }
}

fn belongs(sample: &str, f: &Family) -> bool {
    match f.kind {
        Kind::Histogram => ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| sample.strip_suffix(suffix) == Some(f.name)),
        _ => sample == f.name,
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A counter or gauge sample.
pub fn sample(name: &str, labels: &[(&'static str, String)], value: f64) -> Sample {
    Sample {
        name: name.to_string(),
        labels: labels.to_vec(),
        value,
    }
}

/// Serves `GET /metrics` from `hub` on `listener` until `stop` fires: one short task per scrape,
/// on the executor that calls this.
pub async fn serve(listener: std::net::TcpListener, hub: Arc<Hub>, stop: LocalStop) {
    let limit = accept::limit(64);
    let gate = glommio::sync::Gate::new();
    accept::run(listener, &stop, &limit, |client, slot| {
        accept::spawn_connection(&gate, slot, answer(client, hub.clone()));
    })
    .await;
    let _ = gate.close().await;
}

async fn answer(client: Conn, hub: Arc<Hub>) {
    let mut input = Vec::with_capacity(1024);
    while !input.windows(4).any(|w| w == b"\r\n\r\n") {
        if input.len() >= 8192 {
            return;
        }
        if input.len() == input.capacity() {
            input.reserve(1024);
        }
        let read = async { Some(client.read(&mut input).await) };
        let late = async {
            crate::io::time::sleep(Duration::from_secs(5)).await;
            None
        };
        match futures_lite::future::or(read, late).await {
            Some(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
    let wanted = input.starts_with(b"GET /metrics ") || input.starts_with(b"GET / ");
    let (status, body) = if wanted {
        ("200 OK", hub.render())
    } else {
        (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    let _ = client.write_all_and_close(&mut response).await;
}

/// Publishes `collect()` into `hub`'s slot `i` every [`PUBLISH_EVERY`] until `stop`, and once
/// more at the stop.
pub async fn publish_loop(
    hub: Arc<Hub>,
    i: usize,
    stop: LocalStop,
    collect: impl Fn() -> Vec<Sample>,
) {
    while !stop.is_stopped() {
        hub.publish(i, collect());
        let stopped = async {
            stop.stopped().await;
        };
        futures_lite::future::or(crate::io::time::sleep(PUBLISH_EVERY), stopped).await;
    }
    hub.publish(i, collect());
}
