//! Block trace readers. Every format yields the writes it holds as [`TraceWrite`]s, in file
//! order; reads are skipped.
//!
//! | format | line | time unit | offset, length |
//! |---|---|---|---|
//! | `msr` (SNIA/MSR-Cambridge CSV) | `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime` | 100 ns ticks | bytes |
//! | `disksim` / `disksim-ns` (DiskSim ASCII) | `time devno blkno bcount flags` (flags bit 0: read) | ms / ns | 512-byte sectors |
//! | `vscsi` (CloudPhysics CSV) | header `version,time,op,size,lbn`; op is the SCSI opcode in hex | s | bytes, 512-byte sectors |
//! | `blkparse` (default text) | `maj,min cpu seq time pid action rwbs sector + count [proc]`; `Q` events with `W` | s | 512-byte sectors |

use std::io::BufRead;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// A trace line longer than this is refused (bounds memory on hostile input).
pub const MAX_LINE_BYTES: usize = 4096;
/// Sector size of sector-addressed formats.
const SECTOR_BYTES: u64 = 512;
/// One write is at most this long (a trace naming more is refused): larger than any real
/// I/O (Linux caps a request far lower), and the engine splits what exceeds a batch.
pub const MAX_WRITE_BYTES: u64 = 64 << 20;

/// Trace formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// SNIA / MSR-Cambridge CSV.
    Msr,
    /// DiskSim ASCII, times in milliseconds (the DiskSim default).
    Disksim,
    /// DiskSim ASCII, times in nanoseconds.
    DisksimNs,
    /// CloudPhysics vscsi CSV.
    Vscsi,
    /// Linux blkparse default text output.
    Blkparse,
}

/// One write of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceWrite {
    /// Time since the trace's first record, nanoseconds.
    pub time_ns: u64,
    /// The device it addresses.
    pub device: String,
    /// Byte offset.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
}

/// Lines read to check a trace before anything is registered.
pub const CHECK_LINES: usize = 4096;
/// DiskSim's two time units look alike: a mean gap between writes above this (in the unit
/// named) says the times are really nanoseconds...
const DISKSIM_MS_MAX_MEAN_GAP_NS: u64 = 60_000_000_000;
/// ... and below this, that they are really milliseconds.
const DISKSIM_NS_MIN_MEAN_GAP_NS: u64 = 100;

/// Every format, in the order a sniff names them.
pub const FORMATS: [Format; 5] = [
    Format::Msr,
    Format::Disksim,
    Format::DisksimNs,
    Format::Vscsi,
    Format::Blkparse,
];

fn format_name(f: Format) -> &'static str {
    match f {
        Format::Msr => "msr",
        Format::Disksim => "disksim",
        Format::DisksimNs => "disksim-ns",
        Format::Vscsi => "vscsi",
        Format::Blkparse => "blkparse",
    }
}

/// The mean gap between the writes of `lines` read as `format`, nanoseconds.
fn mean_gap_ns(format: Format, lines: &[String]) -> Option<u64> {
    let times: Vec<u64> = lines
        .iter()
        .filter_map(|l| parse_line(format, l.trim()).ok().flatten())
        .map(|w| w.time_ns)
        .collect();
    let (first, last) = (times.first()?, times.last()?);
    (times.len() > 1).then(|| last.saturating_sub(*first) / (times.len() as u64 - 1))
}

/// Whether the times of `lines` are plausible in `format`'s unit (DiskSim's ms or ns).
fn plausible_times(format: Format, lines: &[String]) -> bool {
    match (format, mean_gap_ns(format, lines)) {
        (Format::Disksim, Some(g)) => g <= DISKSIM_MS_MAX_MEAN_GAP_NS,
        (Format::DisksimNs, Some(g)) => g >= DISKSIM_NS_MIN_MEAN_GAP_NS,
        _ => true,
    }
}

/// The formats every one of `lines` parses in (with at least one write among them, and
/// times that are plausible in the format's unit).
fn looks_like(lines: &[String]) -> Vec<Format> {
    FORMATS
        .into_iter()
        .filter(|&f| {
            let parsed: Vec<_> = lines.iter().map(|l| parse_line(f, l.trim())).collect();
            parsed.iter().all(|p| p.is_ok())
                && parsed.iter().any(|p| matches!(p, Ok(Some(_))))
                && plausible_times(f, lines)
        })
        .collect()
}

/// Checks that `path` opens and that its first [`CHECK_LINES`] lines parse in `format`
/// (all of them, or with `skip_bad` at least one), before anything is registered anywhere.
/// A wrong format is named with the format(s) the lines do look like.
pub fn check(path: &Path, format: Format, skip_bad: bool) -> Result<()> {
    let f = std::fs::File::open(path).ctx(|| format!("open trace {}", path.display()))?;
    let mut lines = Vec::new();
    for l in std::io::BufReader::new(f).lines().take(CHECK_LINES) {
        let l = l.ctx(|| format!("read trace {}", path.display()))?;
        if l.len() > MAX_LINE_BYTES {
            return Err(Error::InvalidParameter {
                param: "trace",
                reason: format!(
                    "{}: a line of {} bytes: this is not a block trace",
                    path.display(),
                    l.len()
                ),
            });
        }
        lines.push(l);
    }
    let results: Vec<_> = lines.iter().map(|l| parse_line(format, l.trim())).collect();
    let bad = results.iter().position(|r| r.is_err());
    let good = results.iter().filter(|r| matches!(r, Ok(Some(_)))).count();
    let failing = bad.filter(|_| !skip_bad || good == 0);
    let no_writes = good == 0;
    let data: Vec<String> = lines
        .iter()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .cloned()
        .collect();
    let implausible = !no_writes && !plausible_times(format, &data);
    if failing.is_none() && !no_writes && !implausible {
        return Ok(());
    }
    let hint = match looks_like(&data).as_slice() {
        [] => "its lines look like none of the formats (msr, disksim, disksim-ns, vscsi, blkparse)"
            .to_owned(),
        fs => format!(
            "its lines look like the {} format (--format {})",
            fs.iter()
                .map(|f| format_name(*f))
                .collect::<Vec<_>>()
                .join(" or "),
            format_name(fs[0])
        ),
    };
    let reason = match failing {
        None if implausible => format!(
            "{}: read as {}, its writes are {} apart on average, which no real trace is; {hint}",
            path.display(),
            format_name(format),
            runtime::units::fmt_secs(mean_gap_ns(format, &data).unwrap_or(0) as f64 / 1e9)
        ),
        Some(i) => format!(
            "{}:{}: not a {} line ({}); {hint}",
            path.display(),
            i + 1,
            format_name(format),
            results[i].as_ref().err().cloned().unwrap_or_default()
        ),
        None => format!(
            "{} holds no write in the {} format; {hint}",
            path.display(),
            format_name(format)
        ),
    };
    Err(Error::InvalidParameter {
        param: "format",
        reason,
    })
}

/// Reads a trace file.
pub struct TraceReader {
    path: PathBuf,
    lines: std::io::Lines<std::io::BufReader<std::fs::File>>,
    format: Format,
    line_no: u64,
    first_time_ns: Option<u64>,
    skip_bad: bool,
    /// Lines skipped as malformed (with `skip_bad`).
    pub bad_lines: u64,
}

impl TraceReader {
    /// Opens `path`. With `skip_bad`, malformed lines are counted instead of failing.
    pub fn open(path: &Path, format: Format, skip_bad: bool) -> Result<TraceReader> {
        let f = std::fs::File::open(path).ctx(|| format!("open trace {}", path.display()))?;
        Ok(TraceReader {
            path: path.into(),
            lines: std::io::BufReader::new(f).lines(),
            format,
            line_no: 0,
            first_time_ns: None,
            skip_bad,
            bad_lines: 0,
        })
    }

    fn bad(&self, reason: impl Into<String>) -> Error {
        Error::TraceLine {
            file: self.path.clone(),
            line: self.line_no,
            reason: reason.into(),
        }
    }
}

impl Iterator for TraceReader {
    type Item = Result<TraceWrite>;

    fn next(&mut self) -> Option<Result<TraceWrite>> {
        loop {
            let line = match self.lines.next()? {
                Ok(l) => l,
                Err(e) => {
                    return Some(Err(Error::Io {
                        context: format!("read {}", self.path.display()),
                        source: e,
                    }))
                }
            };
            self.line_no += 1;
            let parsed = if line.len() > MAX_LINE_BYTES {
                Err(format!(
                    "line of {} bytes (at most {MAX_LINE_BYTES})",
                    line.len()
                ))
            } else {
                parse_line(self.format, line.trim())
            };
            match parsed {
                Ok(None) => continue,
                Ok(Some(mut w)) => {
                    if w.len > MAX_WRITE_BYTES {
                        let e = self.bad(format!(
                            "a write of {} bytes (at most {MAX_WRITE_BYTES})",
                            w.len
                        ));
                        if self.skip_bad {
                            self.bad_lines += 1;
                            continue;
                        }
                        return Some(Err(e));
                    }
                    let first = *self.first_time_ns.get_or_insert(w.time_ns);
                    w.time_ns = w.time_ns.saturating_sub(first);
                    return Some(Ok(w));
                }
                Err(reason) => {
                    if self.skip_bad {
                        self.bad_lines += 1;
                        continue;
                    }
                    return Some(Err(self.bad(reason)));
                }
            }
        }
    }
}

fn num<T: std::str::FromStr>(s: Option<&str>, what: &str) -> Result<T, String> {
    let s = s.ok_or_else(|| format!("missing {what}"))?.trim();
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not a number"))
}

fn secs_to_ns(s: &str, what: &str) -> Result<u64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{what} {s:?} is not a number"))?;
    if !(v.is_finite() && v >= 0.0) {
        return Err(format!("{what} {s:?} is negative or not finite"));
    }
    Ok((v * 1e9) as u64)
}

/// Parses one line: `Ok(None)` for reads, headers, comments and blank lines.
pub fn parse_line(format: Format, line: &str) -> Result<Option<TraceWrite>, String> {
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    match format {
        Format::Msr => parse_msr(line),
        Format::Disksim | Format::DisksimNs => parse_disksim(line, format == Format::DisksimNs),
        Format::Vscsi => parse_vscsi(line),
        Format::Blkparse => parse_blkparse(line),
    }
}

/// MSR Cambridge CSV: `Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime`.
fn parse_msr(line: &str) -> Result<Option<TraceWrite>, String> {
    let f: Vec<&str> = line.split(',').collect();
    if f.len() < 6 {
        return Err(format!(
            "{} fields, expected 7 (Timestamp,Hostname,DiskNumber,Type,Offset,Size,ResponseTime)",
            f.len()
        ));
    }
    let ticks: u64 = num(Some(f[0]), "timestamp")?;
    match f[3].trim().to_ascii_lowercase().as_str() {
        "write" => {}
        "read" => return Ok(None),
        t => return Err(format!("type {t:?} is neither Read nor Write")),
    }
    Ok(Some(TraceWrite {
        time_ns: ticks.saturating_mul(100),
        device: format!("{}:{}", f[1].trim(), f[2].trim()),
        offset: num(Some(f[4]), "offset")?,
        len: num(Some(f[5]), "size")?,
    }))
}

/// DiskSim ASCII: `time devno blkno bcount flags` (time in ms, or ns with `in_ns`).
fn parse_disksim(line: &str, in_ns: bool) -> Result<Option<TraceWrite>, String> {
    let mut it = line.split_whitespace();
    let time = it.next().ok_or("empty line")?;
    let time_ns = if in_ns {
        num::<f64>(Some(time), "time")? as u64
    } else {
        secs_to_ns(time, "time")? / 1000
    };
    let dev: u32 = num(it.next(), "devno")?;
    let blk: u64 = num(it.next(), "blkno")?;
    let cnt: u64 = num(it.next(), "bcount")?;
    let flags: u32 = num(it.next(), "flags")?;
    if flags & 1 == 1 {
        return Ok(None);
    }
    Ok(Some(TraceWrite {
        time_ns,
        device: dev.to_string(),
        offset: blk.checked_mul(SECTOR_BYTES).ok_or("blkno overflows")?,
        len: cnt.checked_mul(SECTOR_BYTES).ok_or("bcount overflows")?,
    }))
}

/// CloudPhysics vscsi CSV: `version,time,op,size,lbn`.
fn parse_vscsi(line: &str) -> Result<Option<TraceWrite>, String> {
    if line.starts_with("version") {
        return Ok(None);
    }
    let f: Vec<&str> = line.split(',').collect();
    if f.len() < 5 {
        return Err(format!(
            "{} fields, expected 5 (version,time,op,size,lbn)",
            f.len()
        ));
    }
    let op = u8::from_str_radix(f[2].trim().trim_start_matches("0x"), 16)
        .map_err(|_| format!("op {:?} is not a hex SCSI opcode", f[2]))?;
    // WRITE(6), WRITE(10), WRITE(12), WRITE(16).
    if !matches!(op, 0x0a | 0x2a | 0xaa | 0x8a) {
        return Ok(None);
    }
    let lbn: u64 = num(Some(f[4]), "lbn")?;
    Ok(Some(TraceWrite {
        time_ns: secs_to_ns(f[1], "time")?,
        device: "0".into(),
        offset: lbn.checked_mul(SECTOR_BYTES).ok_or("lbn overflows")?,
        len: num(Some(f[3]), "size")?,
    }))
}

/// blkparse's default output: queue (`Q`) events of writes.
fn parse_blkparse(line: &str) -> Result<Option<TraceWrite>, String> {
    let f: Vec<&str> = line.split_whitespace().collect();
    // Summary sections and other event lines are not I/O records.
    if f.len() < 10 || !f[0].contains(',') || f[5] != "Q" || f[8] != "+" {
        return Ok(None);
    }
    if !f[6].contains('W') {
        return Ok(None);
    }
    let sector: u64 = num(Some(f[7]), "sector")?;
    let count: u64 = num(Some(f[9]), "count")?;
    Ok(Some(TraceWrite {
        time_ns: secs_to_ns(f[3], "time")?,
        device: f[0].to_owned(),
        offset: sector.checked_mul(SECTOR_BYTES).ok_or("sector overflows")?,
        len: count.checked_mul(SECTOR_BYTES).ok_or("count overflows")?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_format() {
        let w = parse_line(
            Format::Msr,
            "128166372003061629,hm,1,Write,3154059264,4096,30465",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (w.offset, w.len, w.device.as_str()),
            (3154059264, 4096, "hm:1")
        );
        assert_eq!(
            parse_line(Format::Msr, "128166372003061629,hm,1,Read,0,4096,1").unwrap(),
            None
        );
        let w = parse_line(Format::DisksimNs, "1500 0 16 8 0")
            .unwrap()
            .unwrap();
        assert_eq!((w.time_ns, w.offset, w.len), (1500, 8192, 4096));
        let w = parse_line(Format::Disksim, "2.5 1 16 8 0")
            .unwrap()
            .unwrap();
        assert_eq!((w.time_ns, w.device.as_str()), (2_500_000, "1"));
        assert_eq!(parse_line(Format::Disksim, "2.5 1 16 8 1").unwrap(), None);
        let w = parse_line(Format::Vscsi, "1,5,2a,4096,100")
            .unwrap()
            .unwrap();
        assert_eq!((w.time_ns, w.offset, w.len), (5_000_000_000, 51200, 4096));
        assert_eq!(parse_line(Format::Vscsi, "1,5,28,4096,100").unwrap(), None);
        let w = parse_line(
            Format::Blkparse,
            "  8,0    3        1     0.000000000   697  Q  WS 223490 + 8 [kjournald]",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (w.offset, w.len, w.device.as_str()),
            (223490 * 512, 4096, "8,0")
        );
        assert_eq!(
            parse_line(
                Format::Blkparse,
                "  8,0    3        2     0.000001000   697  G  WS 223490 + 8 [kjournald]"
            )
            .unwrap(),
            None
        );
        assert_eq!(
            parse_line(
                Format::Blkparse,
                "  8,0    3        2     0.000001000   697  Q   R 223490 + 8 [cat]"
            )
            .unwrap(),
            None
        );
    }

    #[test]
    fn malformed_lines_are_errors() {
        assert!(parse_line(Format::Msr, "x,hm,1,Write,1,2,3").is_err());
        assert!(parse_line(Format::Msr, "1,hm,1,Erase,1,2,3").is_err());
        assert!(parse_line(Format::Disksim, "1 0 16").is_err());
        assert!(parse_line(Format::Vscsi, "1,5,zz,4096,100").is_err());
        assert!(parse_line(Format::Disksim, "-1 0 16 8 0").is_err());
    }

    #[test]
    fn a_wrong_format_is_named_with_the_one_the_lines_look_like() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        std::fs::write(
            &p,
            "128166372003061629,hm,1,Write,3154059264,4096,30465\n128166372003061630,hm,1,Read,0,4096,1\n",
        )
        .unwrap();
        assert!(check(&p, Format::Msr, false).is_ok());
        let e = check(&p, Format::Blkparse, false).unwrap_err().to_string();
        assert!(e.contains("look like the msr format"), "{e}");
        let e = check(&p, Format::DisksimNs, false).unwrap_err().to_string();
        assert!(
            e.contains("look like the msr format") && e.contains("t.csv:1"),
            "{e}"
        );
        let e = check(&dir.path().join("typo.csv"), Format::Msr, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("typo.csv"), "{e}");
        std::fs::write(&p, "hello world\n").unwrap();
        let e = check(&p, Format::Msr, true).unwrap_err().to_string();
        assert!(e.contains("none of the formats"), "{e}");
    }
}
