//! The pipeline machinery: stages, the runner, artifacts, the workspace and its lock,
//! and the build log. Nothing outside this module knows how artifacts are
//! stored.

pub mod artifact;
mod buildlog;
mod execute;
pub mod runner;
pub mod settings;
pub mod stage;
mod status;
pub mod workspace;

pub use artifact::{Artifact, Status};
pub use runner::{Event, Pipeline, RunError, RunOptions, RunReport, StageReport};
pub use settings::{ConfigError, InvalidValue, NoConfig, SectionConfig, Settings};
pub use stage::{AnyStage, Stage, StageCtx, StageOutput, UpstreamState};
pub use status::{StageState, StatusOptions};
pub use workspace::Workspace;
