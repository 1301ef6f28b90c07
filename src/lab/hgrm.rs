//! Latency histograms leaving the process: HdrHistogram's percentile-distribution text (the
//! `.hgrm` format wrk2 prints and HdrHistogram's plotter reads) and its V2 compressed
//! serialization in base64, which keeps every count so runs can be merged and re-plotted later.

use std::fmt::Write;

use base64::Engine;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};

/// Quantile steps per halving of the distance to 100%, as wrk2 and HdrHistogram print them.
const TICKS_PER_HALF_DISTANCE: u32 = 5;

/// The percentile distribution of `h` (recorded in microseconds) in HdrHistogram's text
/// format, values in milliseconds as wrk2 prints them.
pub fn percentile_distribution(h: &Histogram<u64>) -> String {
    let scale = 1000.0;
    let digits = h.sigfig() as usize;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    );
    let mut total = 0u64;
    for v in h.iter_quantiles(TICKS_PER_HALF_DISTANCE) {
        total += v.count_since_last_iteration();
        let value = h.highest_equivalent(v.value_iterated_to()) as f64 / scale;
        let q = v.quantile_iterated_to();
        if q < 1.0 {
            let _ = writeln!(
                o,
                "{value:>12.digits$} {q:>2.12} {total:>10} {:>14.2}",
                1.0 / (1.0 - q)
            );
        } else {
            let _ = writeln!(o, "{value:>12.digits$} {q:>2.12} {total:>10}");
        }
    }
    let (mean, sd, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (
            h.mean() / scale,
            h.stdev() / scale,
            h.highest_equivalent(h.max()) as f64 / scale,
        )
    };
    // HdrHistogram's sub-bucket count: the power of two that holds 2 × 10^digits.
    let sub_buckets = (2 * 10u64.pow(digits as u32)).next_power_of_two();
    let _ = writeln!(
        o,
        "#[Mean    = {mean:>12.digits$}, StdDeviation   = {sd:>12.digits$}]"
    );
    let _ = writeln!(
        o,
        "#[Max     = {max:>12.digits$}, Total count    = {:>12}]",
        h.len()
    );
    let _ = writeln!(
        o,
        "#[Buckets = {:>12}, SubBuckets     = {sub_buckets:>12}]",
        h.buckets()
    );
    o
}

/// HdrHistogram's V2 deflate serialization of `h`, in standard base64.
pub fn encode(h: &Histogram<u64>) -> String {
    let mut bytes = Vec::new();
    match V2DeflateSerializer::new().serialize(h, &mut bytes) {
        Ok(_) => base64::engine::general_purpose::STANDARD.encode(bytes),
        // Serializing into memory fails only on a histogram the format cannot hold.
        Err(_) => String::new(),
    }
}

/// The histogram [`encode`] wrote.
pub fn decode(text: &str) -> Result<Histogram<u64>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("histogram is not base64: {e}"))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|e| format!("histogram does not decode: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Histogram<u64> {
        let mut h = Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        h
    }

    #[test]
    fn round_trips_every_count() {
        let h = sample();
        let back = decode(&encode(&h)).unwrap();
        assert_eq!(back, h);
        assert!(decode("not base64!").is_err());
    }

    #[test]
    fn prints_the_percentile_distribution_in_milliseconds() {
        let text = percentile_distribution(&sample());
        let mut lines = text.lines();
        assert_eq!(
            lines.next().unwrap().split_whitespace().collect::<Vec<_>>(),
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        let rows: Vec<(f64, f64, u64)> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((
                    f.first()?.parse().ok()?,
                    f.get(1)?.parse().ok()?,
                    f.get(2)?.parse().ok()?,
                ))
            })
            .collect();
        // Percentiles and counts only grow; the median is near 50 ms; the last row is 100%.
        assert!(
            rows.windows(2)
                .all(|w| w[0].1 <= w[1].1 && w[0].2 <= w[1].2)
        );
        let median = rows.iter().find(|r| r.1 >= 0.5).unwrap().0;
        assert!((median - 50.0).abs() < 0.1, "median {median} ms");
        assert_eq!(rows.last().unwrap().1, 1.0);
        assert_eq!(rows.last().unwrap().2, 10_000);
        assert!(text.contains("Total count    =        10000]"));
    }
}
