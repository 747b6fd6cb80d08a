//! Creep: the least-squares slope of memory against ops.

/// Slope of `y` against `x` by least squares, and its standard error; `None` with fewer
/// than three points or no spread in `x`.
pub fn slope(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    if points.len() < 3 {
        return None;
    }
    let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
    let my = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mx).powi(2)).sum();
    if sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let b = sxy / sxx;
    let a = my - b * mx;
    let resid: f64 = points.iter().map(|p| (p.1 - a - b * p.0).powi(2)).sum();
    let se = (resid / (n - 2.0) / sxx).sqrt();
    Some((b, se))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovers_a_known_line_and_refuses_degenerate_input() {
        let pts: Vec<(f64, f64)> = (0..50).map(|i| (i as f64, 3.0 + 0.5 * i as f64)).collect();
        let (b, se) = slope(&pts).unwrap();
        assert!((b - 0.5).abs() < 1e-12 && se < 1e-9);
        assert!(slope(&pts[..2]).is_none());
        assert!(slope(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)]).is_none());
        let noisy: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, if i % 2 == 0 { 1.0 } else { -1.0 }))
            .collect();
        let (b, se) = slope(&noisy).unwrap();
        assert!(b.abs() < 0.05 && se > 0.0);
    }
}
