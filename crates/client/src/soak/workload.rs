//! What a soak run sends: texts drawn from a base set in a chosen pattern.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Every row a new text (all cache misses): the model's steady state.
    Unique,
    /// The base texts over and over (cache hits once warmed).
    Repeat,
    /// Texts drawn with a Zipf(1.1) law over the base set: a few hot, a long tail.
    Zipf,
    /// Bursts of long texts at full speed, then idle spells: memory must come back.
    Burst,
    /// 70 % repeat, 20 % Zipf, 10 % unique.
    Mixed,
}

/// Produces rows for a workload; deterministic for a seed.
pub struct Generator {
    base: Vec<String>,
    long: Vec<String>,
    zipf_cdf: Vec<f64>,
    counter: u64,
    state: u64,
}

impl Generator {
    pub fn new(base: Vec<String>, seed: u64) -> Self {
        assert!(!base.is_empty(), "a soak needs at least one input text");
        let weights: Vec<f64> = (1..=base.len())
            .map(|r| 1.0 / (r as f64).powf(1.1))
            .collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let zipf_cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        // Long texts: eight base texts joined (truncated by the model at 256 tokens).
        let long = (0..base.len())
            .map(|i| {
                (0..8)
                    .map(|k| base[(i + k * 97) % base.len()].as_str())
                    .collect::<Vec<_>>()
                    .join(" ; ")
            })
            .collect();
        Self {
            base,
            long,
            zipf_cdf,
            counter: 0,
            state: seed | 1,
        }
    }

    fn random(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 11) as f64 / (1u64 << 53) as f64
    }

    fn unique(&mut self) -> String {
        self.counter += 1;
        let t = &self.base[(self.counter as usize) % self.base.len()];
        format!("{t} #{}", self.counter)
    }

    fn repeat(&mut self) -> String {
        self.counter += 1;
        self.base[(self.counter as usize) % self.base.len()].clone()
    }

    fn zipf(&mut self) -> String {
        let u = self.random();
        let i = self
            .zipf_cdf
            .partition_point(|c| *c < u)
            .min(self.base.len() - 1);
        self.base[i].clone()
    }

    /// `rows` texts of `workload`; `long` selects the burst phase's long texts.
    pub fn batch(&mut self, workload: Workload, rows: usize, long: bool) -> Vec<String> {
        (0..rows)
            .map(|_| match workload {
                Workload::Unique => self.unique(),
                Workload::Repeat => self.repeat(),
                Workload::Zipf => self.zipf(),
                Workload::Burst if long => {
                    self.counter += 1;
                    let t = &self.long[(self.counter as usize) % self.long.len()];
                    format!("{} #{}", t, self.counter)
                }
                Workload::Burst => self.repeat(),
                Workload::Mixed => {
                    let u = self.random();
                    if u < 0.7 {
                        self.repeat()
                    } else if u < 0.9 {
                        self.zipf()
                    } else {
                        self.unique()
                    }
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_have_their_shape() {
        let base: Vec<String> = (0..100).map(|i| format!("text {i}")).collect();
        let mut g = Generator::new(base, 7);
        let u = g.batch(Workload::Unique, 500, false);
        assert_eq!(
            u.iter().collect::<std::collections::HashSet<_>>().len(),
            500
        );
        let r = g.batch(Workload::Repeat, 500, false);
        assert_eq!(
            r.iter().collect::<std::collections::HashSet<_>>().len(),
            100
        );
        let z = g.batch(Workload::Zipf, 5000, false);
        let top = z.iter().filter(|t| *t == "text 0").count();
        let tail = z.iter().filter(|t| *t == "text 99").count();
        assert!(top > 10 * tail.max(1), "zipf head {top} vs tail {tail}");
        let l = g.batch(Workload::Burst, 3, true);
        assert!(l.iter().all(|t| t.len() > 8 * 6));
    }
}
