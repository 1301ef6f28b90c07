//! Printing a benchmark: ab-style text, one markdown row in the lab's columns, or JSON carrying
//! every number. The measuring is in [`crate::lab::client`]; nothing here touches a socket.

use serde::Serialize;

use crate::lab::client::{self, BenchResult, OpenLoop, Percentiles};

/// Output formats for `ringlab bench`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Reads like ApacheBench, plus HdrHistogram percentiles and the backend spread.
    Text,
    /// One table row in the lab's columns (with the header).
    Markdown,
    /// Every number, machine-readable.
    Json,
}

/// Renders `r` in `format`.
pub fn render(r: &BenchResult, format: Format) -> String {
    match format {
        Format::Text => text(r),
        Format::Markdown => format!("{}{}\n", lab_header(), lab_row(1, r)),
        Format::Json => json(r),
    }
}

/// The lab's table header (two lines: names and alignment).
pub fn lab_header() -> String {
    "| No Test | Concurrency Level | Time taken for test | Complete request | Failed request | \
     Total transferred | Request per second | Time per request | Transfer rate |\n\
     | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
        .to_string()
}

/// One row of the lab's table.
pub fn lab_row(no: usize, r: &BenchResult) -> String {
    format!(
        "| {no} | {} | {:.3} seconds | {} | {} | {} bytes | {:.2} [#/sec] (mean) | {:.3} [ms] (mean) | {:.2} [Kbytes/sec] received |",
        r.concurrency,
        r.elapsed_secs,
        r.complete,
        r.failed.total(),
        r.total_bytes,
        r.requests_per_sec(),
        r.time_per_request_ms(),
        r.transfer_rate_kbps()
    )
}

/// The JSON document for one run: the measured fields plus the derived rates.
#[derive(Serialize)]
pub struct JsonReport<'a> {
    /// Everything measured.
    #[serde(flatten)]
    pub result: &'a BenchResult,
    /// Completed requests per second.
    pub requests_per_sec: f64,
    /// ab's mean time per request, ms.
    pub time_per_request_ms: f64,
    /// ab's mean time per request across all concurrent requests, ms.
    pub time_per_request_all_ms: f64,
    /// KiB received per second.
    pub transfer_rate_kbps: f64,
    /// All failed requests.
    pub failed_total: u64,
}

impl<'a> JsonReport<'a> {
    /// Wraps a result with its derived numbers.
    pub fn new(result: &'a BenchResult) -> JsonReport<'a> {
        JsonReport {
            result,
            requests_per_sec: result.requests_per_sec(),
            time_per_request_ms: result.time_per_request_ms(),
            time_per_request_all_ms: result.time_per_request_all_ms(),
            transfer_rate_kbps: result.transfer_rate_kbps(),
            failed_total: result.failed.total(),
        }
    }
}

fn json(r: &BenchResult) -> String {
    let mut s = serde_json::to_string_pretty(&JsonReport::new(r)).expect("serialisable");
    s.push('\n');
    s
}

/// The open loop's offered and achieved rates, its late sends, and whether the client was the
/// limit.
fn open_loop_rates(o: &mut String, r: &BenchResult, ol: &OpenLoop) {
    use std::fmt::Write;
    let achieved = r.requests_per_sec();
    let _ = writeln!(
        o,
        "Offered rate:           {:.2} [#/sec] ({})",
        ol.offered_rate, ol.arrival
    );
    let _ = writeln!(
        o,
        "Achieved rate:          {achieved:.2} [#/sec] ({:.2}% of offered)",
        100.0 * achieved / ol.offered_rate
    );
    let _ = writeln!(
        o,
        "Sent late (> {} ms):     {} (waiting for one of the -c connections: {}; the client \
         itself: {})",
        client::LATE.as_millis(),
        ol.late,
        ol.late_waiting_for_connection,
        ol.late - ol.late_waiting_for_connection
    );
    let busy: Vec<String> = ol
        .client_busy
        .iter()
        .map(|b| format!("{:.0}%", b * 100.0))
        .collect();
    let _ = writeln!(o, "Client CPU busy:        {}", busy.join(", "));
    if ol.client_bound {
        let _ = writeln!(
            o,
            "Client-bound:           yes: the client could not send at the offered rate (an \
             executor was busy nearly all the time); the limit measured is the client's, not \
             the server's: give it more CPUs (--cpus) or lower --rate"
        );
    } else if achieved < 0.98 * ol.offered_rate && ol.late_waiting_for_connection > 0 {
        let _ = writeln!(
            o,
            "Kept up:                no: requests waited for a free connection (all -c in \
             flight); the server did not keep up with the offered rate"
        );
    }
}

fn text(r: &BenchResult) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let f = &r.failed;
    if r.interrupted {
        let _ = writeln!(
            o,
            "Interrupted:            yes (Ctrl-C or SIGTERM): the numbers below are what was \
             measured until then"
        );
    }
    let _ = writeln!(o, "Server Software:        {}", r.server_software);
    let _ = writeln!(o, "Server Hostname:        {}", r.target.host);
    let _ = writeln!(o, "Server Port:            {}", r.target.port);
    let _ = writeln!(o);
    let _ = writeln!(o, "Document Path:          {}", r.target.path);
    let _ = writeln!(o, "Document Length:        {} bytes", r.document_length);
    let _ = writeln!(o);
    let _ = writeln!(o, "Concurrency Level:      {}", r.concurrency);
    if let Some(ol) = &r.open_loop {
        open_loop_rates(&mut o, r, ol);
    }
    let _ = writeln!(o, "Time taken for tests:   {:.3} seconds", r.elapsed_secs);
    let _ = writeln!(o, "Complete requests:      {}", r.complete);
    let _ = writeln!(o, "Failed requests:        {}", f.total());
    if f.total() > 0 {
        let _ = writeln!(
            o,
            "   (Connect: {}, Receive: {}, Length: {}, Exceptions: {})",
            f.connect, f.receive, f.length, f.exceptions
        );
    }
    if let Some(why) = &r.first_error {
        let _ = writeln!(o, "First failure:          {why}");
    }
    if r.non_2xx > 0 {
        let _ = writeln!(o, "Non-2xx responses:      {}", r.non_2xx);
    }
    if r.keep_alive {
        let _ = writeln!(o, "Keep-Alive requests:    {}", r.keep_alive_requests);
    }
    let _ = writeln!(o, "Total transferred:      {} bytes", r.total_bytes);
    let _ = writeln!(o, "HTML transferred:       {} bytes", r.html_bytes);
    let _ = writeln!(
        o,
        "Requests per second:    {:.2} [#/sec] (mean)",
        r.requests_per_sec()
    );
    let _ = writeln!(
        o,
        "Time per request:       {:.3} [ms] (mean)",
        r.time_per_request_ms()
    );
    let _ = writeln!(
        o,
        "Time per request:       {:.3} [ms] (mean, across all concurrent requests)",
        r.time_per_request_all_ms()
    );
    let _ = writeln!(
        o,
        "Transfer rate:          {:.2} [Kbytes/sec] received",
        r.transfer_rate_kbps()
    );
    let _ = writeln!(o);
    let _ = writeln!(o, "Connection Times (ms)");
    let _ = writeln!(o, "              min  mean[+/-sd] median   max");
    for (name, t) in [
        ("Connect:", &r.connect_ms),
        ("Processing:", &r.processing_ms),
        ("Waiting:", &r.waiting_ms),
        ("Total:", &r.total_ms),
    ] {
        let _ = writeln!(
            o,
            "{name:<12}{:>5.1} {:>5.1} {:>5.1} {:>6.1} {:>7.1}",
            t.min, t.mean, t.sd, t.median, t.max
        );
    }
    let _ = writeln!(o);
    let percentiles = |o: &mut String, l: &Percentiles| {
        let _ = writeln!(
            o,
            "  p50 {}   p90 {}   p99 {}   p99.9 {}   max {}",
            l.p50, l.p90, l.p99, l.p999, l.max
        );
    };
    match &r.open_loop {
        None => {
            let _ = writeln!(o, "Latency (us, HdrHistogram of the total time)");
            percentiles(&mut o, &r.latency_us);
        }
        Some(ol) => {
            let _ = writeln!(
                o,
                "Latency (us, from the intended send time: coordinated omission corrected)"
            );
            percentiles(&mut o, &r.latency_us);
            let _ = writeln!(
                o,
                "Latency (us, from the actual send: uncorrected, what a closed loop reports)"
            );
            percentiles(&mut o, &ol.uncorrected_us);
            let _ = writeln!(o, "Send lag (us, actual minus intended send time)");
            percentiles(&mut o, &ol.send_lag_us);
            let _ = writeln!(
                o,
                "Pacer lag (us, the same where a connection was free: the client's own jitter)"
            );
            percentiles(&mut o, &ol.pacer_lag_us);
        }
    }
    if !r.backends.is_empty() {
        let _ = writeln!(o);
        let _ = writeln!(o, "Responses by Server header");
        for (name, count) in &r.backends {
            let _ = writeln!(o, "  {name:<24} {count}");
        }
    }
    let cpus: Vec<String> = r
        .client_cpus
        .iter()
        .map(|c| c.map_or("unpinned".into(), |c| format!("CPU {c}")))
        .collect();
    let _ = writeln!(o);
    let _ = writeln!(o, "Client executors:       {}", cpus.join(", "));
    o
}
