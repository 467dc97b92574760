//! What the accumulation tests share: comparing parameter sets.

/// The largest, over parameters, of max|a - b| / max|a|: the difference relative to each
/// parameter's own scale (the absolute difference for a parameter that is all zeros).
pub fn largest_relative_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = a
                .iter()
                .zip(b)
                .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
            if scale == 0.0 { diff } else { diff / scale }
        })
        .fold(0.0, f32::max)
}

/// Each parameter's update: `after - before`, element by element.
pub fn updates(after: &[Vec<f32>], before: &[Vec<f32>]) -> Vec<Vec<f32>> {
    after
        .iter()
        .zip(before)
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x - y).collect())
        .collect()
}
