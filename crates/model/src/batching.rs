//! Grouping rows of different lengths into forward passes.
//!
//! A forward pass costs about `rows × longest row` (padding included), and attention
//! grows with the square of the longest row. Sorting rows by token length and cutting
//! the sorted run into groups bounded by padded tokens keeps padding near zero and the
//! work of each pass bounded, whatever mix of short and long texts arrives.

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
