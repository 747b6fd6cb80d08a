//! `samples.csv`, written as the run goes: one line per sample (flushed every tick, so an
//! interrupted run keeps what it measured), the supervisor's cleanups on the line of the
//! sample that first saw them, and heap profiles where they were taken. Samples are not
//! kept in memory during a run (a day's would be tens of MB of the very heap being
//! judged); the report reads the file back at the end.
//!
//! A resumed run appends a new *segment*: its engine starts afresh, so its times, op and
//! row counts continue from the last line and its own warm-up is excluded again.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use anyhow::Context;
use keel_engine::cleanup::{CleanupLevel, CleanupRecord};
use serde::{Deserialize, Serialize};

use super::Sample;

/// One line of `samples.csv` (`settled`: 1 for a reading taken with producers held and
/// nothing in flight). Several cleanups seen at one sample are joined with `;`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Line {
    segment: u32,
    t_s: f64,
    ops: u64,
    rows: u64,
    rss_bytes: u64,
    allocated_bytes: u64,
    resident_bytes: u64,
    cache_bytes: u64,
    in_flight_rows: u64,
    cleanups: u64,
    device_reserved_bytes: u64,
    device_in_use_bytes: u64,
    settled: u8,
    /// `level/reason` of each cleanup first seen at this sample.
    cleanup: String,
    /// Each one's duration, broadcast to the last acknowledgement.
    cleanup_ms: String,
    /// Bytes its members reported freed (cache entries, pooled buffers).
    cleanup_freed_bytes: String,
    /// RSS before less RSS after (what it gave back to the OS).
    cleanup_rss_returned_bytes: String,
    heap_profile: String,
}

/// A cleanup as the soak saw it: when, why, how long, what it returned.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SeenCleanup {
    pub segment: u32,
    pub t_s: f64,
    pub ops: u64,
    pub level: String,
    pub reason: String,
    pub ms: f64,
    pub freed_bytes: u64,
    pub rss_returned_bytes: i64,
}

impl SeenCleanup {
    fn of(r: &CleanupRecord, s: &Sample) -> Self {
        Self {
            segment: s.segment,
            t_s: s.t_s,
            ops: s.ops,
            level: level_name(r.level).into(),
            reason: r.reason.clone(),
            ms: r.total_micros as f64 / 1000.0,
            freed_bytes: r.acks.iter().map(|a| a.freed_bytes).sum(),
            rss_returned_bytes: r.rss_before as i64 - r.rss_after as i64,
        }
    }

    /// What the picture's legend groups by: `idle`, `soft watermark`, `hard watermark`,
    /// `creep`, `requested`, or the level for a reason not known here.
    pub fn kind(&self) -> &str {
        let r = self.reason.as_str();
        let device = r.starts_with("GPU");
        match () {
            _ if r.starts_with("idle") => "idle",
            _ if r.starts_with("creep") => "creep",
            _ if r.starts_with("requested") => "requested",
            _ if r.contains("soft watermark") && device => "device soft watermark",
            _ if r.contains("hard watermark") && device => "device hard watermark",
            _ if r.contains("soft watermark") => "soft watermark",
            _ if r.contains("hard watermark") => "hard watermark",
            _ => &self.level,
        }
    }
}

fn level_name(level: CleanupLevel) -> &'static str {
    match level {
        CleanupLevel::Trim => "trim",
        CleanupLevel::Gentle => "gentle",
        CleanupLevel::Full => "full",
    }
}

/// Where the last line of an earlier run left off.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Offsets {
    pub segment: u32,
    pub t_s: f64,
    pub ops: u64,
    pub rows: u64,
    pub cleanups: u64,
}

pub struct SampleLog {
    writer: csv::Writer<File>,
    path: PathBuf,
    /// Added to this segment's engine counters.
    pub offsets: Offsets,
}

impl SampleLog {
    /// A new `samples.csv` in `dir` (an existing one is replaced).
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join("samples.csv");
        let writer =
            csv::Writer::from_path(&path).with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            writer,
            path,
            offsets: Offsets::default(),
        })
    }

    /// Appends a new segment to `dir/samples.csv`, continuing from its last line.
    pub fn resume(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("samples.csv");
        let (samples, settled, _) = read(&path)?;
        let last = samples
            .iter()
            .chain(&settled)
            .max_by(|a, b| a.t_s.total_cmp(&b.t_s))
            .with_context(|| format!("{} has no samples to resume from", path.display()))?;
        let offsets = Offsets {
            segment: last.segment + 1,
            t_s: last.t_s,
            ops: last.ops,
            rows: last.rows,
            cleanups: last.cleanups,
        };
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("appending to {}", path.display()))?;
        let writer = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(file);
        Ok(Self {
            writer,
            path,
            offsets,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A sample of this segment's engine, with the earlier segments' totals added.
    pub fn offset(&self, mut s: Sample) -> Sample {
        s.segment = self.offsets.segment;
        s.t_s += self.offsets.t_s;
        s.ops += self.offsets.ops;
        s.rows += self.offsets.rows;
        s.cleanups += self.offsets.cleanups;
        s
    }

    /// Writes one line and flushes it: `s` already offset, `cleanups` first seen at it.
    pub fn write(
        &mut self,
        s: &Sample,
        settled: bool,
        cleanups: &[CleanupRecord],
        heap_profile: Option<&str>,
    ) -> anyhow::Result<Vec<SeenCleanup>> {
        let seen: Vec<SeenCleanup> = cleanups.iter().map(|r| SeenCleanup::of(r, s)).collect();
        let join =
            |f: &dyn Fn(&SeenCleanup) -> String| seen.iter().map(f).collect::<Vec<_>>().join(";");
        let line = Line {
            segment: s.segment,
            t_s: (s.t_s * 1000.0).round() / 1000.0,
            ops: s.ops,
            rows: s.rows,
            rss_bytes: s.rss,
            allocated_bytes: s.allocated,
            resident_bytes: s.resident,
            cache_bytes: s.cache_bytes,
            in_flight_rows: s.in_flight_rows,
            cleanups: s.cleanups,
            device_reserved_bytes: s.device_reserved,
            device_in_use_bytes: s.device_in_use,
            settled: settled.into(),
            // `;` separates cleanups: keep it out of a reason.
            cleanup: join(&|c| format!("{}/{}", c.level, c.reason.replace(';', ","))),
            cleanup_ms: join(&|c| format!("{:.3}", c.ms)),
            cleanup_freed_bytes: join(&|c| c.freed_bytes.to_string()),
            cleanup_rss_returned_bytes: join(&|c| c.rss_returned_bytes.to_string()),
            heap_profile: heap_profile.unwrap_or_default().to_string(),
        };
        self.writer.serialize(&line)?;
        self.writer.flush()?;
        Ok(seen)
    }
}

/// Every sample (settled ones apart) and every cleanup of a `samples.csv`, all segments.
pub fn read(path: &Path) -> anyhow::Result<(Vec<Sample>, Vec<Sample>, Vec<SeenCleanup>)> {
    let mut reader =
        csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    let (mut samples, mut settled, mut cleanups) = (Vec::new(), Vec::new(), Vec::new());
    for (i, line) in reader.deserialize::<Line>().enumerate() {
        // An interrupted run may have cut its last line short: ignore only that one.
        let line = match line {
            Ok(l) => l,
            Err(e) if e.is_io_error() => return Err(e.into()),
            Err(e) => {
                tracing::warn!("{}: line {} skipped: {e}", path.display(), i + 2);
                continue;
            }
        };
        let s = Sample {
            segment: line.segment,
            t_s: line.t_s,
            ops: line.ops,
            rows: line.rows,
            rss: line.rss_bytes,
            allocated: line.allocated_bytes,
            resident: line.resident_bytes,
            cache_bytes: line.cache_bytes,
            in_flight_rows: line.in_flight_rows,
            cleanups: line.cleanups,
            device_reserved: line.device_reserved_bytes,
            device_in_use: line.device_in_use_bytes,
        };
        if !line.cleanup.is_empty() {
            let ms: Vec<&str> = line.cleanup_ms.split(';').collect();
            let freed: Vec<&str> = line.cleanup_freed_bytes.split(';').collect();
            let returned: Vec<&str> = line.cleanup_rss_returned_bytes.split(';').collect();
            for (k, c) in line.cleanup.split(';').enumerate() {
                let (level, reason) = c.split_once('/').unwrap_or((c, ""));
                cleanups.push(SeenCleanup {
                    segment: s.segment,
                    t_s: s.t_s,
                    ops: s.ops,
                    level: level.into(),
                    reason: reason.into(),
                    ms: ms.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0),
                    freed_bytes: freed.get(k).and_then(|v| v.parse().ok()).unwrap_or(0),
                    rss_returned_bytes: returned.get(k).and_then(|v| v.parse().ok()).unwrap_or(0),
                });
            }
        }
        if line.settled == 1 {
            settled.push(s);
        } else {
            samples.push(s);
        }
    }
    Ok((samples, settled, cleanups))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_engine::cleanup::CleanupAck;

    fn sample(t_s: f64, ops: u64) -> Sample {
        Sample {
            t_s,
            ops,
            rows: ops * 25,
            rss: 100 + ops,
            allocated: 50 + ops,
            cleanups: ops / 10,
            ..Sample::default()
        }
    }

    #[test]
    fn a_resumed_log_continues_where_the_last_line_left_off() {
        let dir = tempfile::tempdir().unwrap();
        let record = CleanupRecord {
            level: CleanupLevel::Trim,
            reason: "idle for 2000 ms; after a burst".into(),
            acks: vec![CleanupAck::new(
                "cache",
                4096,
                String::new(),
                std::time::Duration::from_micros(1500),
            )],
            total_micros: 2500,
            rss_before: 9000,
            rss_after: 1000,
            at_ms: 1,
        };
        let mut log = SampleLog::create(dir.path()).unwrap();
        log.write(&log.offset(sample(1.0, 10)), false, &[], None)
            .unwrap();
        let seen = log
            .write(
                &log.offset(sample(2.0, 20)),
                false,
                &[record.clone(), record],
                Some("a.heap"),
            )
            .unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].kind(), "idle");
        log.write(&log.offset(sample(2.5, 20)), true, &[], None)
            .unwrap();
        drop(log);

        // The process died; a new engine's counters start from zero.
        let mut log = SampleLog::resume(dir.path()).unwrap();
        assert_eq!(
            log.offsets,
            Offsets {
                segment: 1,
                t_s: 2.5,
                ops: 20,
                rows: 500,
                cleanups: 2,
            }
        );
        log.write(&log.offset(sample(1.0, 5)), false, &[], None)
            .unwrap();
        drop(log);

        let (samples, settled, cleanups) = read(&dir.path().join("samples.csv")).unwrap();
        assert_eq!(samples.len(), 3);
        assert_eq!(settled.len(), 1);
        let last = samples.last().unwrap();
        assert_eq!(
            (last.segment, last.t_s, last.ops, last.rows),
            (1, 3.5, 25, 625)
        );
        assert_eq!(cleanups.len(), 2);
        assert_eq!(cleanups[1].level, "trim");
        assert_eq!(cleanups[1].reason, "idle for 2000 ms, after a burst");
        assert_eq!(cleanups[1].ms, 2.5);
        assert_eq!(cleanups[1].freed_bytes, 4096);
        assert_eq!(cleanups[1].rss_returned_bytes, 8000);
        assert_eq!(cleanups[1].ops, 20);
    }
}
