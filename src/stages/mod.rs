//! The pipeline's stages, one file each, in execution order.

pub mod baseline;
pub mod download;
pub mod evaluate;
pub mod prepare;
pub mod probe;
pub mod quantize;
pub mod report;
pub mod train;

use crate::pipeline::{Pipeline, Stage};

/// The stages this build of medpipe has, in pipeline order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    let mut stages: Vec<Box<dyn Stage>> = vec![
        Box::new(probe::Probe),
        Box::new(download::Download),
        Box::new(baseline::Baseline),
        Box::new(quantize::Quantize),
        // Prepare resolves `dataset = ..` sources through download.json (registered above).
        Box::new(prepare::Prepare::new(&["download"])),
        Box::new(train::Train),
    ];
    // Evaluate reads the variant stages (quantize, train) registered before it, when present.
    let earlier: Vec<&'static str> = stages.iter().map(|s| s.name()).collect();
    stages.push(Box::new(evaluate::Evaluate::new(&earlier)));
    // The report comes last and reads whatever ran before it.
    let earlier = stages.iter().map(|s| s.name()).collect();
    stages.push(Box::new(report::Report::new(earlier)));
    stages
}

/// The standard pipeline.
pub fn pipeline() -> Pipeline {
    Pipeline::new(registry())
}
