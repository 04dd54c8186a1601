//! The pipeline's stages, one file each, in execution order.

pub mod prepare;
pub mod probe;

use crate::pipeline::{Pipeline, Stage};

/// The stages this build of medpipe has, in pipeline order.
pub fn registry() -> Vec<Box<dyn Stage>> {
    vec![Box::new(probe::Probe), Box::new(prepare::Prepare)]
}

/// The standard pipeline.
pub fn pipeline() -> Pipeline {
    Pipeline::new(registry())
}
