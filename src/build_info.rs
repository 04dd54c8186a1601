//! What build of medpipe this is, and how it writes times: recorded in every artifact,
//! the build log and benchmark results. A leaf: it imports nothing from the crate.

use std::time::SystemTime;

/// medpipe's version, recorded in every artifact and hashed into every input.
pub const MEDPIPE_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The git commit medpipe was built from, when built from a git checkout.
pub fn git_commit() -> Option<String> {
    option_env!("MEDPIPE_GIT_COMMIT")
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// `t` as RFC 3339 UTC to the second (`2026-11-29T05:40:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Now, as [`rfc3339`].
pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}
