//! `data.normalize`: features rescaled column by column with statistics of the training rows
//! only, so that no test row leaks into what the model is trained on. The statistics are saved
//! in the run folder and applied, as they are, to every row scored or predicted later.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::settings::Normalize;

/// Each feature `x` becomes `(x - shift) / spread`; a column with a spread of 0 (constant in
/// the training rows) becomes 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scaling {
    pub kind: Normalize,
    pub shift: Vec<f64>,
    pub spread: Vec<f64>,
}

impl Scaling {
    /// The statistics of `rows`, `width` features each (summed in row order, in f64: the same
    /// numbers whatever the thread count). `None` for `Normalize::None`.
    pub fn fit(kind: Normalize, rows: &[f32], width: usize) -> Option<Self> {
        let count = (rows.len() / width.max(1)) as f64;
        let columns = || (0..width).map(|c| rows.iter().skip(c).step_by(width).map(|&x| x as f64));
        let (shift, spread) = match kind {
            Normalize::None => return None,
            Normalize::Standard => {
                let means: Vec<f64> = columns().map(|c| c.sum::<f64>() / count).collect();
                let deviations = columns()
                    .zip(&means)
                    .map(|(c, mean)| (c.map(|x| (x - mean).powi(2)).sum::<f64>() / count).sqrt())
                    .collect();
                (means, deviations)
            }
            Normalize::Minmax => {
                let least: Vec<f64> = columns().map(|c| c.fold(f64::INFINITY, f64::min)).collect();
                let ranges = columns()
                    .zip(&least)
                    .map(|(c, least)| c.fold(f64::NEG_INFINITY, f64::max) - least)
                    .collect();
                (least, ranges)
            }
        };
        Some(Scaling {
            kind,
            shift,
            spread,
        })
    }

    /// Rescales `rows` in place (each value alone: any split of the work gives the same bits).
    pub fn apply(&self, rows: &mut [f32]) {
        let width = self.shift.len().max(1);
        rows.par_chunks_mut(width).for_each(|row| {
            for ((x, shift), spread) in row.iter_mut().zip(&self.shift).zip(&self.spread) {
                *x = if *spread == 0.0 {
                    0.0
                } else {
                    ((*x as f64 - shift) / spread) as f32
                };
            }
        });
    }

    /// The columns (from 0) constant in the training rows: they carry nothing, and are left at 0.
    pub fn constant_columns(&self) -> Vec<usize> {
        (0..self.spread.len())
            .filter(|&c| self.spread[c] == 0.0)
            .collect()
    }

    /// Whether the statistics hold one pair of finite numbers per feature of `width`: a
    /// saved file may have been edited.
    pub fn fits(&self, width: usize) -> bool {
        self.shift.len() == width
            && self.spread.len() == width
            && self.shift.iter().chain(&self.spread).all(|v| v.is_finite())
            && self.spread.iter().all(|&s| s >= 0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_scaling_gives_mean_0_and_deviation_1_on_the_training_rows() {
        let rows = [1.0, 10.0, 5.0, 3.0, 10.0, 7.0];
        let scaling = Scaling::fit(Normalize::Standard, &rows, 3).unwrap();
        assert_eq!(scaling.shift, [2.0, 10.0, 6.0]);
        assert_eq!(scaling.spread, [1.0, 0.0, 1.0]);
        assert_eq!(scaling.constant_columns(), [1]);
        let mut scaled = rows;
        scaling.apply(&mut scaled);
        assert_eq!(scaled, [-1.0, 0.0, -1.0, 1.0, 0.0, 1.0]);
    }

    #[test]
    fn minmax_scaling_maps_the_training_rows_onto_0_to_1() {
        let rows = [2.0, -4.0, 4.0, 0.0, 3.0, 4.0];
        let scaling = Scaling::fit(Normalize::Minmax, &rows, 2).unwrap();
        assert_eq!(
            (scaling.shift.clone(), scaling.spread.clone()),
            (vec![2.0, -4.0], vec![2.0, 8.0])
        );
        let mut scaled = rows;
        scaling.apply(&mut scaled);
        assert_eq!(scaled, [0.0, 0.0, 1.0, 0.5, 0.5, 1.0]);
        // Later rows may fall outside [0, 1]: the statistics are the training rows'.
        let mut later = [6.0, 12.0];
        scaling.apply(&mut later);
        assert_eq!(later, [2.0, 2.0]);
        assert!(Scaling::fit(Normalize::None, &rows, 2).is_none());
    }

    #[test]
    fn saved_statistics_must_fit_the_features() {
        let scaling = Scaling::fit(Normalize::Standard, &[1.0, 2.0, 3.0, 5.0], 2).unwrap();
        assert!(scaling.fits(2));
        assert!(!scaling.fits(3));
        let mut edited = scaling.clone();
        edited.spread[0] = -1.0;
        assert!(!edited.fits(2));
    }
}
