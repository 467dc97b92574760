//! Dynamic loss scaling, as PyTorch's `GradScaler` does it.
//!
//! f16 has 5 exponent bits: gradients below about 6e-8 flush to zero, above 65504 overflow. The
//! loss is multiplied by a scale before backward so that small gradients stay representable,
//! and the gradients are divided by it again, in f32, before the optimizer sees them. A step
//! whose gradients hold an inf or a NaN is skipped and the scale shrinks; after
//! `growth_interval` clean steps in a row the scale grows again.

use serde::{Deserialize, Serialize};

use crate::settings::PrecisionSettings;

/// What a checkpoint keeps of the scaler, so that a resumed run scales as the whole run would.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// The loss scale of the next step (1 when the run does not scale).
    pub scale: f64,
    /// Clean steps in a row since the scale last changed.
    pub clean_steps: u64,
    /// Steps skipped so far because their gradients were not finite.
    pub skipped_steps: u64,
}

impl Default for ScalerState {
    /// A run without scaling (and what a checkpoint from before scaling existed means).
    fn default() -> Self {
        Self {
            scale: 1.0,
            clean_steps: 0,
            skipped_steps: 0,
        }
    }
}

/// The scaling policy of a run and its state.
#[derive(Debug, Clone)]
pub struct LossScaler {
    growth_interval: u64,
    growth_factor: f64,
    backoff_factor: f64,
    pub state: ScalerState,
}

impl LossScaler {
    /// A scaler at the start of a run.
    pub fn new(settings: &PrecisionSettings) -> Self {
        Self::resume(
            settings,
            ScalerState {
                scale: settings.init_scale,
                ..ScalerState::default()
            },
        )
    }

    /// A scaler that continues from `state`.
    pub fn resume(settings: &PrecisionSettings, state: ScalerState) -> Self {
        Self {
            growth_interval: settings.growth_interval,
            growth_factor: settings.growth_factor,
            backoff_factor: settings.backoff_factor,
            state,
        }
    }

    /// The factor the loss is multiplied by this step.
    pub fn scale(&self) -> f32 {
        self.state.scale as f32
    }

    /// Records a step whose gradients were `finite` (or not) and says whether the optimizer
    /// should apply it.
    pub fn update(&mut self, finite: bool) -> bool {
        let state = &mut self.state;
        if !finite {
            state.scale = (state.scale * self.backoff_factor).max(f64::from(f32::MIN_POSITIVE));
            state.clean_steps = 0;
            state.skipped_steps += 1;
            return false;
        }
        state.clean_steps += 1;
        if state.clean_steps == self.growth_interval {
            // Stay a finite f32: the scale multiplies an f32 loss.
            state.scale = (state.scale * self.growth_factor).min(f64::from(f32::MAX) / 2.0);
            state.clean_steps = 0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(growth_interval: u64) -> PrecisionSettings {
        PrecisionSettings {
            growth_interval,
            ..PrecisionSettings::default()
        }
    }

    #[test]
    fn backs_off_on_overflow_and_grows_after_clean_steps() {
        let mut scaler = LossScaler::new(&policy(3));
        assert_eq!(scaler.scale(), 65536.0);
        assert!(!scaler.update(false));
        assert_eq!(scaler.scale(), 32768.0);
        assert!(scaler.update(true));
        assert!(scaler.update(true));
        assert_eq!(scaler.scale(), 32768.0);
        assert!(scaler.update(true));
        assert_eq!(scaler.scale(), 65536.0);
        assert_eq!(scaler.state.skipped_steps, 1);
        assert_eq!(scaler.state.clean_steps, 0);
    }

    #[test]
    fn an_overflow_resets_the_clean_run() {
        let mut scaler = LossScaler::new(&policy(2));
        scaler.update(true);
        scaler.update(false);
        scaler.update(true);
        assert_eq!(scaler.scale(), 32768.0, "one clean step since the overflow");
        scaler.update(true);
        assert_eq!(scaler.scale(), 65536.0);
    }

    #[test]
    fn the_scale_stays_a_finite_positive_f32() {
        let mut scaler = LossScaler::new(&PrecisionSettings {
            init_scale: 1e38,
            growth_interval: 1,
            ..PrecisionSettings::default()
        });
        for _ in 0..10 {
            scaler.update(true);
        }
        assert!(scaler.scale().is_finite());
        for _ in 0..400 {
            scaler.update(false);
        }
        assert!(scaler.scale() > 0.0);
    }
}
