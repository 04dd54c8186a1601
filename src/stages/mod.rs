//! The pipeline's stages, one file each, in execution order.

pub mod download;
pub mod prepare;
pub mod probe;
pub mod report;

use crate::pipeline::{Pipeline, Stage};

/// The stages this build of medpipe has, in pipeline order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    let mut stages: Vec<Box<dyn Stage>> = vec![
        Box::new(probe::Probe),
        Box::new(download::Download),
        Box::new(prepare::Prepare),
    ];
    // The report comes last and reads whatever ran before it.
    let earlier = stages.iter().map(|s| s.name()).collect();
    stages.push(Box::new(report::Report::new(earlier)));
    stages
}

/// The standard pipeline.
pub fn pipeline() -> Pipeline {
    Pipeline::new(registry())
}
