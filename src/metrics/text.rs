//! The OpenMetrics 1.0 text format (a pure writer, unit-tested here), and [`Histogram`], the
//! plain data a histogram is kept as.
//!
//! One family at a time: `# TYPE`, `# UNIT` (when the name ends in a unit), `# HELP`, then its
//! samples; counters' samples end in `_total`; label values are escaped (`\\`, `\"`, `\n`);
//! [`Text::finish`] appends the `# EOF` line the format ends with.

use std::fmt::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The content type the text is served with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// A sample's labels: (name, value).
pub type Labels<'a> = &'a [(&'a str, &'a str)];

/// Observations counted into fixed buckets. Plain data: the caller gives the bounds when it
/// observes and when it writes, and a state with another number of buckets (an older or newer
/// zdd's) is read as it is and padded or cut at the next observation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Histogram {
    /// Observations per bucket, not cumulative; the last one is beyond the largest bound.
    pub buckets: Vec<u64>,
    pub count: u64,
    /// The sum of the observations, in microseconds (exact, and an integer in JSON).
    pub sum_us: u64,
}

impl Histogram {
    /// Count one observation into the first bucket whose bound (in microseconds) holds it.
    pub fn observe(&mut self, bounds_us: &[u64], d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.buckets.resize(bounds_us.len() + 1, 0);
        let i = bounds_us.iter().position(|&b| us <= b).unwrap_or(bounds_us.len());
        self.buckets[i] = self.buckets[i].saturating_add(1);
        self.count = self.count.saturating_add(1);
        self.sum_us = self.sum_us.saturating_add(us);
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_us as f64 / 1e6
    }
}

/// The text being written.
#[derive(Default)]
pub struct Text {
    out: String,
}

impl Text {
    pub fn new() -> Text {
        Text {
            out: String::with_capacity(8 * 1024),
        }
    }

    fn family(&mut self, name: &str, kind: &str, unit: Option<&str>, help: &str) {
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        if let Some(unit) = unit {
            let _ = writeln!(self.out, "# UNIT {name} {unit}");
        }
        let _ = writeln!(self.out, "# HELP {name} {}", escape(help, false));
    }

    fn sample(&mut self, name: &str, suffix: &str, labels: Labels, extra: Option<(&str, &str)>, value: &str) {
        self.out.push_str(name);
        self.out.push_str(suffix);
        let all = labels.iter().copied().chain(extra);
        let mut first = true;
        for (k, v) in all {
            self.out.push(if first { '{' } else { ',' });
            first = false;
            let _ = write!(self.out, "{k}=\"{}\"", escape(v, true));
        }
        if !first {
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(value);
        self.out.push('\n');
    }

    /// A counter family `name` (without `_total`), one sample per label set.
    pub fn counter(&mut self, name: &str, help: &str, samples: &[(Labels, u64)]) {
        self.family(name, "counter", None, help);
        for (labels, v) in samples {
            self.sample(name, "_total", labels, None, &v.to_string());
        }
    }

    /// A gauge family; `unit` when the name ends in `_<unit>` (`seconds`, `bytes`).
    pub fn gauge(&mut self, name: &str, unit: Option<&str>, help: &str, samples: &[(Labels, f64)]) {
        self.family(name, "gauge", unit, help);
        for (labels, v) in samples {
            self.sample(name, "", labels, None, &number(*v));
        }
    }

    /// An info family: `name_info{labels} 1`.
    pub fn info(&mut self, name: &str, help: &str, labels: Labels) {
        self.family(name, "info", None, help);
        self.sample(name, "_info", labels, None, "1");
    }

    /// A histogram family in seconds, one series per label set, with `bounds_us` in
    /// microseconds.
    pub fn histogram(&mut self, name: &str, help: &str, bounds_us: &[u64], series: &[(Labels, &Histogram)]) {
        self.family(name, "histogram", Some("seconds"), help);
        for (labels, h) in series {
            let mut cumulative = 0u64;
            for (i, &b) in bounds_us.iter().enumerate() {
                cumulative = cumulative.saturating_add(h.buckets.get(i).copied().unwrap_or(0));
                let le = number(b as f64 / 1e6);
                self.sample(name, "_bucket", labels, Some(("le", &le)), &cumulative.to_string());
            }
            // +Inf holds every observation, whatever number of buckets the data has.
            self.sample(name, "_bucket", labels, Some(("le", "+Inf")), &h.count.to_string());
            self.sample(name, "_sum", labels, None, &number(h.sum_seconds()));
            self.sample(name, "_count", labels, None, &h.count.to_string());
        }
    }

    /// The whole text, with the `# EOF` line.
    pub fn finish(mut self) -> String {
        self.out.push_str("# EOF\n");
        self.out
    }
}

/// A number as OpenMetrics writes it: integers as `3` (`3.0` for bucket bounds reads the
/// same), fractions as the shortest text that reads back the same.
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.1}")
    } else {
        format!("{v}")
    }
}

/// Escape a label value (`\\`, `\"`, `\n`) or a HELP text (`\\`, `\n`).
fn escape(s: &str, quote: bool) -> std::borrow::Cow<'_, str> {
    if !s.bytes().any(|b| b == b'\\' || b == b'\n' || (quote && b == b'"')) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quote => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_samples_and_eof() {
        let mut t = Text::new();
        t.counter(
            "zdd_reloads",
            "Reloads.",
            &[(&[("result", "ok")], 2), (&[("result", "fa\"il\\ed\n")], 0)],
        );
        t.gauge("zdd_age_seconds", Some("seconds"), "Age.\nline", &[(&[], 1.5)]);
        t.info("zdd_build", "Build.", &[("version", "1.0")]);
        let text = t.finish();
        assert_eq!(
            text,
            "# TYPE zdd_reloads counter\n# HELP zdd_reloads Reloads.\nzdd_reloads_total{result=\"ok\"} 2\n\
             zdd_reloads_total{result=\"fa\\\"il\\\\ed\\n\"} 0\n\
             # TYPE zdd_age_seconds gauge\n# UNIT zdd_age_seconds seconds\n# HELP zdd_age_seconds Age.\\nline\n\
             zdd_age_seconds 1.5\n\
             # TYPE zdd_build info\n# HELP zdd_build Build.\nzdd_build_info{version=\"1.0\"} 1\n# EOF\n"
        );
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_with_inf() {
        let bounds = [1_000, 10_000, 1_000_000];
        let mut h = Histogram::default();
        h.observe(&bounds, Duration::from_micros(1_000)); // on the bound: in it
        h.observe(&bounds, Duration::from_millis(5));
        h.observe(&bounds, Duration::from_secs(2)); // beyond every bound
        assert_eq!((h.buckets.clone(), h.count, h.sum_us), (vec![1, 1, 0, 1], 3, 2_006_000));
        let mut t = Text::new();
        t.histogram("zdd_d_seconds", "D.", &bounds, &[(&[("result", "ok")], &h)]);
        let text = t.finish();
        assert!(
            text.contains(
                "zdd_d_seconds_bucket{result=\"ok\",le=\"0.001\"} 1\n\
                 zdd_d_seconds_bucket{result=\"ok\",le=\"0.01\"} 2\n\
                 zdd_d_seconds_bucket{result=\"ok\",le=\"1.0\"} 2\n\
                 zdd_d_seconds_bucket{result=\"ok\",le=\"+Inf\"} 3\n\
                 zdd_d_seconds_sum{result=\"ok\"} 2.006\n\
                 zdd_d_seconds_count{result=\"ok\"} 3\n"
            ),
            "{text}"
        );
        // A state with fewer buckets (an older zdd's) is padded at the next observation.
        let mut old = Histogram {
            buckets: vec![1],
            count: 1,
            sum_us: 10,
        };
        old.observe(&bounds, Duration::from_millis(5));
        assert_eq!(old.buckets, vec![1, 1, 0, 0]);
    }

    #[test]
    fn numbers() {
        assert_eq!(number(3.0), "3.0");
        assert_eq!(number(0.0025), "0.0025");
        assert_eq!(number(300.0), "300.0");
        assert_eq!(number(f64::INFINITY), "+Inf");
    }
}
