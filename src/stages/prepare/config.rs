//! The `[prepare]` config section: seed, shard size, contact sheet, split, rendering,
//! filters and sources, with their defaults and the checks run when the config loads.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::data::eval_docs;
use crate::data::filter::FilterConfig;
use crate::data::render::RenderConfig;
use crate::data::source::SourceConfig;
use crate::data::split::SplitConfig;

/// `[prepare]` config section.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrepareConfig {
    /// Seed for generation, degradations, the split and the contact sheet.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Items per resumable shard.
    #[serde(default = "default_shard_size")]
    pub shard_size: usize,
    /// Pages shown on `reports/prepare_contact_sheet.png` (0: none).
    #[serde(default = "default_contact")]
    pub contact_sheet_pages: usize,
    /// Split fractions.
    #[serde(default)]
    pub split: SplitConfig,
    /// Page rendering.
    #[serde(default)]
    pub render: RenderConfig,
    /// Sample filters.
    #[serde(default)]
    pub filters: FilterConfig,
    /// The sources, read in order (de-duplication keeps the first occurrence).
    #[serde(default = "default_sources")]
    pub sources: Vec<SourceConfig>,
}

fn default_seed() -> u64 {
    42
}
fn default_shard_size() -> usize {
    256
}
fn default_contact() -> usize {
    12
}
fn default_sources() -> Vec<SourceConfig> {
    vec![SourceConfig::Synthetic {
        name: "synthetic".into(),
        count: 320,
        allow_empty: false,
    }]
}

impl Default for PrepareConfig {
    fn default() -> Self {
        Self {
            seed: default_seed(),
            shard_size: default_shard_size(),
            contact_sheet_pages: default_contact(),
            split: SplitConfig::default(),
            render: RenderConfig::default(),
            filters: FilterConfig::default(),
            sources: default_sources(),
        }
    }
}

impl crate::pipeline::SectionConfig for PrepareConfig {
    /// Checks `[prepare]`: at least one source, each named well and once; split fractions
    /// that sum to 1; a usable page geometry; probabilities in [0, 1]. Filters that drop
    /// everything are allowed: the stage then fails naming them (or keeps going with
    /// `allow_empty`).
    ///
    /// # Errors
    /// The first value outside its range. An empty source list is refused here, not after
    /// training found nothing to train on (issue 15).
    fn validate(&self) -> Result<(), crate::pipeline::InvalidValue> {
        use crate::pipeline::settings::{at_least_one, check, fraction};
        check(
            !self.sources.is_empty(),
            "prepare.sources",
            "[]",
            "must list at least one [[prepare.sources]]",
        )?;
        let mut seen = BTreeSet::new();
        for (i, s) in self.sources.iter().enumerate() {
            let n = s.name();
            let key = format!("prepare.sources[{i}].name");
            check(
                !n.is_empty()
                    && n.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                &key,
                format!("{n:?}"),
                "must be letters, digits, `_` or `-`",
            )?;
            check(
                n != eval_docs::SOURCE,
                &key,
                format!("{n:?}"),
                "is reserved for the evaluation documents",
            )?;
            check(
                seen.insert(n),
                &key,
                format!("{n:?}"),
                "must differ from every other source's name",
            )?;
        }
        at_least_one("prepare.shard_size", self.shard_size as u64)?;
        let sp = &self.split;
        for (k, v) in [("train", sp.train), ("val", sp.val), ("test", sp.test)] {
            fraction(&format!("prepare.split.{k}"), v)?;
        }
        check(
            sp.validate().is_ok(),
            "prepare.split",
            format!("train {} + val {} + test {}", sp.train, sp.val, sp.test),
            "the three fractions must sum to 1",
        )?;
        let r = &self.render;
        check(
            r.width_px >= crate::data::render::SIDE_MULTIPLE,
            "prepare.render.width_px",
            r.width_px,
            &format!("must be at least {}", crate::data::render::SIDE_MULTIPLE),
        )?;
        at_least_one("prepare.render.max_pixels", r.max_pixels)?;
        at_least_one("prepare.render.min_font_px", r.min_font_px)?;
        check(
            r.font_px >= r.min_font_px,
            "prepare.render.font_px",
            r.font_px,
            &format!("must be at least min_font_px ({})", r.min_font_px),
        )?;
        let d = &r.degrade;
        for (k, v) in [
            ("rotate_prob", d.rotate_prob),
            ("blur_prob", d.blur_prob),
            ("speckle_prob", d.speckle_prob),
            ("jpeg_prob", d.jpeg_prob),
        ] {
            fraction(&format!("prepare.render.degrade.{k}"), v)?;
        }
        check(
            (1..=100).contains(&d.jpeg_quality),
            "prepare.render.degrade.jpeg_quality",
            d.jpeg_quality,
            "must be in [1, 100]",
        )?;
        Ok(())
    }
}
