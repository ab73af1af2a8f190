//! Prometheus text rendering of per-row series.

/// One Prometheus metric family drawn from rows of `T`.
pub struct Series<T> {
    /// Metric name.
    pub name: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    /// Help text.
    pub help: &'static str,
    /// The value of a row.
    pub value: fn(&T) -> f64,
}

/// Escapes a label value (backslash, quote, newline), as the exposition format requires.
pub fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Appends each series in the Prometheus text format, one sample per row with its labels
/// (already formatted and escaped, e.g. `disk="1"`).
pub fn render_series<T>(out: &mut String, series: &[Series<T>], rows: &[(String, T)]) {
    use std::fmt::Write;
    for s in series {
        let _ = writeln!(
            out,
            "# HELP {} {}\n# TYPE {} {}",
            s.name, s.help, s.name, s.kind
        );
        for (labels, row) in rows {
            let _ = writeln!(out, "{}{{{labels}}} {}", s.name, (s.value)(row));
        }
    }
}
