//! Grouping rows of different lengths into forward passes.
//!
//! A forward pass costs about `rows × longest row` (padding included), and attention
//! grows with the square of the longest row. Sorting rows by token length and cutting
//! the sorted run into groups bounded by padded tokens keeps padding near zero and the
//! work of each pass bounded, whatever mix of short and long texts arrives.

/// Sequence lengths a pass is padded to on a device that compiles kernels per shape: each
/// at most 1.5× the one before, so padding wastes at most a third of a pass, and a dozen
/// shapes cover BERT's 512 positions.
pub const LENGTH_BUCKETS: &[usize] = &[8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512];

/// The bucket `len` is padded to: the smallest bucket that holds it, at most `max` (the
/// model's `max_seq_length`), never below `len`.
pub fn length_bucket(len: usize, max: usize) -> usize {
    LENGTH_BUCKETS
        .iter()
        .copied()
        .find(|&b| b >= len)
        .unwrap_or(len)
        .min(max)
        .max(len)
}

/// Limits of one forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most rows in one pass.
    pub max_rows: usize,
    /// Most padded tokens (`rows × longest row`) in one pass. A single row longer than
    /// this still forms a pass on its own.
    pub max_tokens: usize,
}

/// Splits rows, given their token lengths, into passes. Returns row indices per pass;
/// every index appears exactly once. Rows of equal length keep their input order.
pub fn plan(lengths: &[usize], limits: BatchLimits) -> Vec<Vec<usize>> {
    let max_rows = limits.max_rows.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    // Longest first: the first pass of a run then shows its worst-case memory at once.
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
    let mut passes = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut longest = 0;
    for i in order {
        let len = lengths[i].max(1);
        let new_longest = longest.max(len);
        if !current.is_empty()
            && (current.len() >= max_rows || (current.len() + 1) * new_longest > limits.max_tokens)
        {
            passes.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(len);
        current.push(i);
    }
    if !current.is_empty() {
        passes.push(current);
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(lengths: &[usize], limits: BatchLimits) {
        let passes = plan(lengths, limits);
        let mut seen = vec![false; lengths.len()];
        for pass in &passes {
            assert!(!pass.is_empty());
            assert!(pass.len() <= limits.max_rows);
            let longest = pass.iter().map(|&i| lengths[i].max(1)).max().unwrap();
            assert!(
                pass.len() == 1 || pass.len() * longest <= limits.max_tokens,
                "{pass:?}"
            );
            for &i in pass {
                assert!(!seen[i], "row {i} planned twice");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|s| *s), "a row was left out");
    }

    #[test]
    fn every_row_once_within_limits() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for case in 0..200 {
            let n = case % 97;
            let lengths: Vec<usize> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 300) as usize
                })
                .collect();
            let limits = BatchLimits {
                max_rows: 1 + case % 40,
                max_tokens: 64 + (case * 37) % 4000,
            };
            check(&lengths, limits);
        }
    }

    #[test]
    fn groups_similar_lengths_to_avoid_padding() {
        let lengths = [5, 200, 6, 190, 5, 7];
        let passes = plan(
            &lengths,
            BatchLimits {
                max_rows: 3,
                max_tokens: 10_000,
            },
        );
        assert_eq!(passes, vec![vec![1, 3, 5], vec![2, 0, 4]]);
    }

    #[test]
    fn lengths_pad_to_the_next_bucket_within_the_model_limit() {
        assert_eq!(length_bucket(1, 256), 8);
        assert_eq!(length_bucket(8, 256), 8);
        assert_eq!(length_bucket(9, 256), 16);
        assert_eq!(length_bucket(33, 256), 48);
        assert_eq!(length_bucket(200, 256), 256);
        assert_eq!(length_bucket(250, 250), 250);
        assert_eq!(length_bucket(200, 250), 250);
        for len in 1..=512 {
            let b = length_bucket(len, 512);
            assert!(b >= len && b * 2 <= len * 3 + 16, "{len} → {b}");
        }
    }

    #[test]
    fn an_overlong_row_gets_a_pass_of_its_own() {
        let passes = plan(
            &[500, 3, 3],
            BatchLimits {
                max_rows: 8,
                max_tokens: 100,
            },
        );
        assert_eq!(passes, vec![vec![0], vec![1, 2]]);
    }
}
