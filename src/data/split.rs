//! Seeded train/val/test split, stratified by (source, document type).
//!
//! Each stratum is sorted by id, shuffled with an rng seeded from the split seed and the
//! stratum's name, and cut at the cumulative rounded fractions. Every sample lands in exactly
//! one split; the same seed gives the same assignment (and, since split files are written in
//! id order, byte-identical files), another seed a different one.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::filter::content_hash;
use super::sample::Sample;

/// `[prepare.split]`: fractions of each stratum per split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitConfig {
    /// Share for training, 0..=1.
    #[serde(default = "default_train")]
    pub train: f64,
    /// Share for validation, 0..=1.
    #[serde(default = "default_val")]
    pub val: f64,
    /// Share for test, 0..=1.
    #[serde(default = "default_val")]
    pub test: f64,
}

fn default_train() -> f64 {
    0.8
}
fn default_val() -> f64 {
    0.1
}

impl Default for SplitConfig {
    fn default() -> Self {
        Self {
            train: 0.8,
            val: 0.1,
            test: 0.1,
        }
    }
}

/// A split configuration that does not add up.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("prepare.split: train {train} + val {val} + test {test} must be 1 with each in 0..=1")]
pub struct SplitError {
    pub train: f64,
    pub val: f64,
    pub test: f64,
}

impl SplitConfig {
    /// Checks the fractions.
    ///
    /// # Errors
    /// A fraction outside 0..=1 or a sum other than 1 (±1e-6).
    pub fn validate(&self) -> Result<(), SplitError> {
        let ok = [self.train, self.val, self.test]
            .iter()
            .all(|f| (0.0..=1.0).contains(f))
            && (self.train + self.val + self.test - 1.0).abs() < 1e-6;
        if ok {
            Ok(())
        } else {
            Err(SplitError {
                train: self.train,
                val: self.val,
                test: self.test,
            })
        }
    }
}

/// The three splits, each sorted by id.
#[derive(Debug, Default)]
pub struct Splits {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub test: Vec<Sample>,
}

/// Assigns every sample to one split.
///
/// # Errors
/// Invalid fractions.
pub fn split(samples: Vec<Sample>, cfg: &SplitConfig, seed: u64) -> Result<Splits, SplitError> {
    cfg.validate()?;
    let mut strata: BTreeMap<(String, String), Vec<Sample>> = BTreeMap::new();
    for s in samples {
        strata
            .entry((s.source.clone(), s.doc_type.clone()))
            .or_default()
            .push(s);
    }
    let mut out = Splits::default();
    for ((source, doc_type), mut group) in strata {
        group.sort_by(|a, b| a.id.cmp(&b.id));
        let h = content_hash(&[&seed.to_le_bytes(), source.as_bytes(), doc_type.as_bytes()]);
        let mut rng = ChaCha8Rng::from_seed(h);
        group.shuffle(&mut rng);
        let n = group.len() as f64;
        let n_train = (n * cfg.train).round() as usize;
        let n_train_val = ((n * (cfg.train + cfg.val)).round() as usize).max(n_train);
        for (i, s) in group.into_iter().enumerate() {
            if i < n_train {
                out.train.push(s);
            } else if i < n_train_val {
                out.val.push(s);
            } else {
                out.test.push(s);
            }
        }
    }
    for v in [&mut out.train, &mut out.val, &mut out.test] {
        v.sort_by(|a, b| a.id.cmp(&b.id));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                id: format!("s/{i:04}"),
                source: if i % 3 == 0 { "a".into() } else { "b".into() },
                doc_type: format!("t{}", i % 4),
                image: String::new(),
                prompt: String::new(),
                target: String::new(),
                ground_truth: vec![],
            })
            .collect()
    }

    fn ids(v: &[Sample]) -> Vec<String> {
        v.iter().map(|s| s.id.clone()).collect()
    }

    #[test]
    fn every_sample_lands_in_exactly_one_split() {
        let s = split(samples(500), &SplitConfig::default(), 1).unwrap();
        let mut all: Vec<String> = [ids(&s.train), ids(&s.val), ids(&s.test)].concat();
        assert_eq!(all.len(), 500);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 500);
    }

    #[test]
    fn fractions_hold_per_stratum() {
        let s = split(samples(800), &SplitConfig::default(), 1).unwrap();
        // 8 strata of 100 (source a/b × 4 types, uneven): each cut within one sample of 80/10/10.
        assert!((s.train.len() as i64 - 640).abs() <= 8, "{}", s.train.len());
        assert!((s.val.len() as i64 - 80).abs() <= 8, "{}", s.val.len());
        for t in 0..4 {
            let ty = format!("t{t}");
            let tr = s.train.iter().filter(|x| x.doc_type == ty).count();
            let te = s.test.iter().filter(|x| x.doc_type == ty).count();
            assert!(tr > 4 * te, "type {ty}: train {tr} test {te}");
        }
    }

    #[test]
    fn same_seed_same_assignment_other_seed_different() {
        let a = split(samples(300), &SplitConfig::default(), 7).unwrap();
        let b = split(samples(300), &SplitConfig::default(), 7).unwrap();
        let c = split(samples(300), &SplitConfig::default(), 8).unwrap();
        assert_eq!(ids(&a.test), ids(&b.test));
        assert_eq!(ids(&a.train), ids(&b.train));
        assert_ne!(ids(&a.test), ids(&c.test));
    }

    #[test]
    fn fractions_must_sum_to_one() {
        let bad = SplitConfig {
            train: 0.8,
            val: 0.3,
            test: 0.1,
        };
        assert!(split(samples(10), &bad, 0).is_err());
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("must be 1"));
    }
}
