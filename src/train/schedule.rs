//! Learning-rate schedule: linear warmup then cosine decay to zero, as transformers'
//! `get_cosine_schedule_with_warmup` (optimization.py, num_cycles = 0.5).

/// Linear warmup over `warmup_steps`, then half a cosine down to 0 at `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WarmupCosine {
    /// Peak learning rate, reached at the end of warmup.
    pub peak_lr: f64,
    /// Optimizer steps of linear warmup from 0.
    pub warmup_steps: u64,
    /// Total optimizer steps of the run.
    pub total_steps: u64,
}

impl WarmupCosine {
    /// Learning rate for optimizer step `step` (0-based: the rate used by the first step is
    /// `lr(0)`, as the HF LambdaLR gives before its first `scheduler.step()`).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        // Clamped: past the end HF would climb again; a finished schedule stays at 0.
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let factor = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.peak_lr * factor.max(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: WarmupCosine = WarmupCosine {
        peak_lr: 2e-4,
        warmup_steps: 10,
        total_steps: 110,
    };

    #[test]
    fn warmup_rises_linearly_from_zero() {
        assert_eq!(S.lr(0), 0.0);
        assert!((S.lr(5) - 1e-4).abs() < 1e-12);
        assert!((S.lr(10) - 2e-4).abs() < 1e-12);
    }

    #[test]
    fn cosine_is_half_at_midpoint_and_zero_at_the_end() {
        assert!((S.lr(60) - 1e-4).abs() < 1e-12);
        assert!(S.lr(110).abs() < 1e-12);
        assert!(S.lr(200).abs() < 1e-12, "no restart after the end");
    }

    #[test]
    fn no_warmup_starts_at_peak() {
        let s = WarmupCosine {
            warmup_steps: 0,
            ..S
        };
        assert_eq!(s.lr(0), 2e-4);
    }
}
